"""Backends turn a model into an ``ActivationSource``; each imports its framework inside itself only."""
