"""Micro-batching: requests from many threads answered together, one batch at a time, by the callers themselves.

A caller whose request is not answered yet and finds no batch running runs the next one in its own thread: the
first waiting request and everything queued behind it, up to `max_size`; with `max_wait_s` > 0 it first waits
that long for more while the batch is not full. A lone request is therefore answered in its caller's thread
with no wait at the default of 0: handing it to a worker thread and its answer back cost about 0.6 ms of
wake-ups on a 2-core VM, a tenth of a demo answer. Under load a batch forms from what queued while the previous
one ran. The batch function gets the items in arrival order and returns one result per item; if it raises,
every request of that batch gets the error.

One batch at a time also means one caller of the batch function at a time, which is what encoders that are
not thread-safe (a shared Hugging Face fast tokenizer raises "Already borrowed") need.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class BatchSettings:
    max_size: int = 32  # requests per batch
    max_wait_s: float = 0.0  # how long a batch that is not full waits for more requests

    def __post_init__(self) -> None:
        if self.max_size < 1 or self.max_wait_s < 0:
            raise ValueError(f"batching needs max_size >= 1 and max_wait_s >= 0, got {self}")


class MicroBatcher(Generic[Item, Result]):
    """Calls `answer(items)` on batches of the items that callers wait for, one batch at a time; thread-safe."""

    def __init__(
        self, answer: Callable[[Sequence[Item]], Sequence[Result]], settings: BatchSettings = BatchSettings()
    ) -> None:
        self._answer = answer
        self.settings = settings
        self._pending: deque[tuple[Item, Future[Result]]] = deque()
        self._state = threading.Condition()  # guards _pending, _running and _closed
        self._running = False
        self._closed = False

    def __call__(self, items: Sequence[Item]) -> list[Result]:
        """The results of `items`, in order, batched with whatever else is waiting."""
        with self._state:
            if self._closed:
                raise RuntimeError("the micro-batcher is closed")
            futures: list[Future[Result]] = [Future() for _ in items]
            self._pending.extend(zip(items, futures, strict=True))
            self._state.notify_all()  # a batch gathering within max_wait_s takes them
        for future in futures:
            self._serve_until(future)
        return [future.result() for future in futures]

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not those of the batch that is running)."""
        with self._state:
            return len(self._pending)

    def close(self) -> None:
        """Refuse new requests, and return once the queued ones are answered."""
        with self._state:
            self._closed = True
            while self._running or self._pending:
                self._state.wait()

    def _serve_until(self, future: Future[Result]) -> None:
        """Run batches in this thread, whenever none is running, until `future` has its result."""
        while True:
            with self._state:
                while self._running and not future.done():
                    self._state.wait()
                if future.done():
                    return
                self._running = True
                batch = self._gather()
            try:
                self._run(batch)
            finally:
                with self._state:
                    self._running = False
                    self._state.notify_all()

    def _gather(self) -> list[tuple[Item, Future[Result]]]:
        """The next batch from the queue; called holding `_state`, which waiting for more releases."""
        deadline = time.perf_counter() + self.settings.max_wait_s
        while len(self._pending) < self.settings.max_size and (remaining := deadline - time.perf_counter()) > 0:
            self._state.wait(remaining)
        return [self._pending.popleft() for _ in range(min(len(self._pending), self.settings.max_size))]

    def _run(self, batch: list[tuple[Item, Future[Result]]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = self._answer(items)
            if len(results) != len(items):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(items)} items")
        except BaseException as error:  # the batch's callers get it; the next caller runs the next batch
            for _, future in batch:
                future.set_exception(error)
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
