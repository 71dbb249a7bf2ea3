"""Names shortened in the middle: within the width, both ends kept, block numbers kept where they fit."""

import pytest

from probecore.labels import shorten_middle


@pytest.mark.parametrize(
    "name, width, shown",
    [("encoder.layer.3.attention.output.dense.output", 24, "encoder.layer.3...output"),
     ("encoder.layer.101.attention.output.dense.branch0", 24, "encoder.layer.101...nch0"),
     ("model/block_3a_expand_activation/Relu:0", 24, "model/block_3a.../Relu:0"),
     ("layers.63", 24, "layers.63"),
     ("abcdefghij", 5, "a...j")],
)  # fmt: skip
def test_names_are_cut_in_the_middle_keeping_numbers(name, width, shown):
    assert shorten_middle(name, width) == shown


def test_shortened_names_fit_and_keep_both_ends(rng):
    alphabet = list("abcdefgh0123456789/_-")  # no dot: the only "..." is the cut
    for _ in range(300):
        name = "".join(rng.choice(alphabet, size=rng.integers(1, 80)))
        width = int(rng.integers(5, 40))
        shown = shorten_middle(name, width)
        assert len(shown) <= width
        if len(name) <= width:
            assert shown == name
        else:
            head, tail = shown.split("...", 1)
            assert name.startswith(head) and name.endswith(tail) and head and tail
