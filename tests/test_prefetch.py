"""Batches of lazy inputs are loaded a batch ahead, in order, with errors at the batch they belong to."""

import threading

import numpy as np
import pytest

from probecore import prefetch
from probecore.errors import DataError


class LazyRows:
    """An array-like that loads rows when sliced (as an image folder does) and records which batches it began."""

    def __init__(self, values, fail_at=None):
        self.values, self.fail_at = values, fail_at
        self.started = []
        self.second_started = threading.Event()

    def __len__(self):
        return len(self.values)

    def __getitem__(self, rows):
        self.started.append(rows.start)
        if len(self.started) == 2:
            self.second_started.set()
        if rows.start == self.fail_at:
            raise DataError(f"cannot read rows from {rows.start}")
        return self.values[rows]


def test_batches_are_the_slices_in_order(rng):
    values = rng.normal(size=(23, 3))
    for x in (values, LazyRows(values)):
        got = list(prefetch.batches(x, 5))
        assert [start for start, _ in got] == [0, 5, 10, 15, 20]
        np.testing.assert_array_equal(np.concatenate([batch for _, batch in got]), values)


def test_the_next_batch_loads_while_this_one_is_used(rng):
    lazy = LazyRows(rng.normal(size=(12, 2)))
    batches = prefetch.batches(lazy, 4)
    next(batches)
    # the consumer still holds batch 0: the loader has begun batch 1 on its own
    assert lazy.second_started.wait(timeout=30)
    assert [start for start, _ in batches] == [4, 8]


def test_an_error_comes_with_its_batch_and_leaving_early_stops_loading(rng):
    lazy = LazyRows(rng.normal(size=(20, 2)), fail_at=10)
    seen = []
    with pytest.raises(DataError, match="cannot read rows from 10"):
        for start, _ in prefetch.batches(lazy, 5):
            seen.append(start)
    assert seen == [0, 5]
    early = LazyRows(rng.normal(size=(40, 2)))
    for start, _ in prefetch.batches(early, 5):
        break
    assert max(early.started) <= 5  # one batch ahead at most, then nothing more
