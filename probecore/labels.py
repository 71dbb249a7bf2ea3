"""Layer and checkpoint names made to fit where they are shown: the terminal table, the figures' axes, the
chain of boxes in report.html. The full name is kept in report.json and in the HTML's details."""

from __future__ import annotations

ELLIPSIS = "..."
SEPARATORS = "./_:-"


def shorten_middle(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters, a stretch of its middle replaced by ``...``: a layer's name
    says most at both ends (``encoder.layer.3...output``: which block, and which tensor in it).

    Of the places the cut can go, the one that keeps the most digits wins (block numbers tell repeated
    blocks apart), then one that cuts at separators (``.``, ``/``, ``_``), then the one nearest the middle."""
    if len(name) <= width:
        return name
    if width <= len(ELLIPSIS) + 1:
        return name[:width]
    kept = width - len(ELLIPSIS)

    def at_separator(position: int) -> bool:
        return name[position - 1] in SEPARATORS or name[position] in SEPARATORS

    def merit(head: int) -> tuple:
        tail = len(name) - (kept - head)
        digits = sum(char.isdigit() for char in name[:head] + name[tail:])
        return digits, at_separator(head) + at_separator(tail), -abs(head - (kept + 1) // 2)

    head = max(range(1, kept), key=merit)
    return name[:head] + ELLIPSIS + name[len(name) - (kept - head) :]
