"""``python -m probecore.cli`` runs the same app as the ``probe`` command."""

from .app import main

main()
