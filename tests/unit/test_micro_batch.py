"""Micro-batching: a lone request is answered at once, requests queued behind a running batch are answered
together up to the size bound, each gets its own result, and a failing batch fails only its own requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from gda.micro_batch import BatchSettings, MicroBatcher


class Doubler:
    """Doubles numbers; holds its first batch until released, so that later requests queue behind it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()  # the first batch is running
        self.release = threading.Event()

    def __call__(self, items: Sequence[int]) -> list[int]:
        if not self.batches:
            self.entered.set()
            self.release.wait(timeout=10)
        self.batches.append(list(items))
        if -1 in items:
            raise ValueError("no negative numbers")
        return [2 * item for item in items]


def _wait_until_queued(batcher: MicroBatcher, n: int) -> None:
    deadline = time.monotonic() + 10
    while batcher._queue.qsize() < n:
        assert time.monotonic() < deadline, "the requests never queued"
        time.sleep(0.005)


def test_a_lone_request_is_answered_alone_and_without_waiting() -> None:
    doubler = Doubler()
    doubler.release.set()
    batcher = MicroBatcher(doubler, BatchSettings(max_size=8, max_wait_s=0.0))
    started = time.perf_counter()
    assert batcher([21]) == [42]
    assert time.perf_counter() - started < 1.0
    assert batcher([5]) == [10]
    assert doubler.batches == [[21], [5]]
    batcher.close()


def test_requests_queued_behind_a_batch_are_answered_together_up_to_the_bound() -> None:
    doubler = Doubler()
    batcher = MicroBatcher(doubler, BatchSettings(max_size=4))
    first = batcher.submit(0)
    assert doubler.entered.wait(timeout=10)
    later = [batcher.submit(i) for i in range(1, 11)]
    _wait_until_queued(batcher, 10)
    doubler.release.set()
    assert first.result(timeout=10) == 0
    assert [f.result(timeout=10) for f in later] == [2 * i for i in range(1, 11)]
    assert doubler.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    batcher.close()


def test_a_failing_batch_fails_its_own_requests_and_the_next_batch_is_answered() -> None:
    doubler = Doubler()
    batcher = MicroBatcher(doubler, BatchSettings(max_size=2))
    blocker = batcher.submit(1)
    assert doubler.entered.wait(timeout=10)
    bad, with_bad, good = batcher.submit(-1), batcher.submit(3), batcher.submit(4)
    _wait_until_queued(batcher, 3)
    doubler.release.set()
    assert blocker.result(timeout=10) == 2
    for future in (bad, with_bad):
        with pytest.raises(ValueError, match="no negative numbers"):
            future.result(timeout=10)
    assert good.result(timeout=10) == 8
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)


def test_a_wait_gathers_requests_that_arrive_within_it() -> None:
    doubler = Doubler()
    doubler.release.set()
    batcher = MicroBatcher(doubler, BatchSettings(max_size=8, max_wait_s=0.5))
    first = batcher.submit(1)
    time.sleep(0.05)
    second = batcher.submit(2)
    assert (first.result(timeout=10), second.result(timeout=10)) == (2, 4)
    assert doubler.batches == [[1, 2]]
    batcher.close()
    with pytest.raises(ValueError, match="max_size >= 1"):
        BatchSettings(max_size=0)
