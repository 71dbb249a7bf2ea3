"""Layer and checkpoint names made to fit where they are shown: the terminal table, the figures' axes, the
chain of boxes in report.html. The full name is kept in report.json and in the HTML's details."""

from __future__ import annotations

ELLIPSIS = "..."


def shorten_middle(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters, its middle replaced by ``...``: a layer's name says most at
    both ends (``encoder.layer.3...output``: which block, and which tensor in it)."""
    if len(name) <= width:
        return name
    if width <= len(ELLIPSIS):
        return name[:width]
    kept = width - len(ELLIPSIS)
    head = (kept + 1) // 2
    return name[:head] + ELLIPSIS + name[len(name) - (kept - head) :]
