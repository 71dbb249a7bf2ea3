"""The ``probe`` command line: one module wires the commands, one module per command."""
