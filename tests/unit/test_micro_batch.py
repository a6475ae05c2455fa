"""Micro-batching: a lone request is answered at once in its caller's thread, requests queued behind a running
batch are answered together up to the size bound, each gets its own result, and a failing batch fails only its
own requests."""

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


class Caller(threading.Thread):
    """Calls the batcher with `items` from its own thread, as a server's request thread does."""

    def __init__(self, batcher: MicroBatcher, items: list[int]) -> None:
        super().__init__(daemon=True)
        self.batcher, self.items = batcher, items
        self.results: list[int] | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.results = self.batcher(self.items)
        except BaseException as error:
            self.error = error

    def outcome(self) -> list[int] | BaseException:
        self.join(timeout=10)
        assert not self.is_alive(), "the caller never got its answer"
        return self.error if self.error is not None else self.results


def _wait_until_queued(batcher: MicroBatcher, n: int) -> None:
    deadline = time.monotonic() + 10
    while batcher.queued < n:
        assert time.monotonic() < deadline, "the requests never queued"
        time.sleep(0.005)


def test_a_lone_request_is_answered_alone_in_its_callers_thread_and_without_waiting() -> None:
    doubler = Doubler()
    doubler.release.set()
    threads: list[threading.Thread] = []
    batcher = MicroBatcher(lambda items: threads.append(threading.current_thread()) or doubler(items))
    started = time.perf_counter()
    assert batcher([21]) == [42]
    assert time.perf_counter() - started < 1.0
    assert batcher([5]) == [10]
    assert doubler.batches == [[21], [5]]
    assert threads == [threading.current_thread()] * 2
    batcher.close()


def test_requests_queued_behind_a_batch_are_answered_together_up_to_the_bound() -> None:
    doubler = Doubler()
    batcher = MicroBatcher(doubler, BatchSettings(max_size=4))
    first = Caller(batcher, [0])
    assert doubler.entered.wait(timeout=10)
    later = Caller(batcher, list(range(1, 11)))
    _wait_until_queued(batcher, 10)
    doubler.release.set()
    assert first.outcome() == [0]
    assert later.outcome() == [2 * i for i in range(1, 11)]
    assert doubler.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    batcher.close()


def test_a_failing_batch_fails_its_own_requests_and_the_next_batch_is_answered() -> None:
    doubler = Doubler()
    batcher = MicroBatcher(doubler, BatchSettings(max_size=2))
    blocker = Caller(batcher, [1])
    assert doubler.entered.wait(timeout=10)
    bad = Caller(batcher, [-1, 3])
    _wait_until_queued(batcher, 2)
    good = Caller(batcher, [4])
    _wait_until_queued(batcher, 3)
    doubler.release.set()
    assert blocker.outcome() == [2]
    failed = bad.outcome()
    assert isinstance(failed, ValueError) and "no negative numbers" in str(failed)
    assert good.outcome() == [8]
    assert doubler.batches == [[1], [-1, 3], [4]]
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher([1])


def test_a_wait_gathers_requests_that_arrive_within_it_and_close_answers_them_first() -> None:
    doubler = Doubler()
    doubler.release.set()
    batcher = MicroBatcher(doubler, BatchSettings(max_size=8, max_wait_s=0.5))
    first = Caller(batcher, [1])
    time.sleep(0.05)
    second = Caller(batcher, [2])
    _wait_until_queued(batcher, 2)
    batcher.close()  # returns once both are answered
    assert doubler.batches == [[1, 2]]
    assert (first.outcome(), second.outcome()) == ([2], [4])
    with pytest.raises(ValueError, match="max_size >= 1"):
        BatchSettings(max_size=0)
