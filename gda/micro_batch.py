"""Micro-batching: requests from many threads answered together by one worker thread.

The worker takes the first waiting request at once and everything queued behind it, up to `max_size`; with
`max_wait_s` > 0 it then waits that long for more while the batch is not full. A lone request therefore pays
no wait at the default of 0, and under load a batch forms from what queued while the previous one ran. The
batch function gets the items in arrival order and returns one result per item; if it raises, every request
of that batch gets the error.

One worker also means one caller of the batch function at a time, which is what encoders that are not
thread-safe (a shared Hugging Face fast tokenizer raises "Already borrowed") need.
"""

from __future__ import annotations

import queue
import threading
import time
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


_STOP = object()


class MicroBatcher(Generic[Item, Result]):
    """Calls `answer(items)` on batches of submitted items in one worker thread; thread-safe."""

    def __init__(
        self, answer: Callable[[Sequence[Item]], Sequence[Result]], settings: BatchSettings = BatchSettings()
    ) -> None:
        self._answer = answer
        self.settings = settings
        self._queue: queue.SimpleQueue[tuple[Item, Future[Result]] | object] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="gda-micro-batch", daemon=True)
        self._closed = False
        self._worker.start()

    def submit(self, item: Item) -> Future[Result]:
        if self._closed:
            raise RuntimeError("the micro-batcher is closed")
        future: Future[Result] = Future()
        self._queue.put((item, future))
        return future

    def __call__(self, items: Sequence[Item]) -> list[Result]:
        """The results of `items`, in order, batched with whatever else is waiting."""
        futures = [self.submit(item) for item in items]
        return [future.result() for future in futures]

    def close(self) -> None:
        """Answer what is queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._worker.join()

    def _gather(self, first: tuple[Item, Future[Result]]) -> tuple[list[tuple[Item, Future[Result]]], bool]:
        batch, stopping = [first], False
        deadline = time.perf_counter() + self.settings.max_wait_s
        while len(batch) < self.settings.max_size:
            remaining = deadline - time.perf_counter()
            try:
                entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                stopping = True
                break
            batch.append(entry)  # type: ignore[arg-type]
        return batch, stopping

    def _run(self) -> None:
        stopping = False
        while not stopping:
            entry = self._queue.get()
            if entry is _STOP:
                return
            batch, stopping = self._gather(entry)  # type: ignore[arg-type]
            items = [item for item, _ in batch]
            try:
                results = self._answer(items)
                if len(results) != len(items):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(items)} items")
            except BaseException as error:  # the callers get it; the worker keeps serving
                for _, future in batch:
                    future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
