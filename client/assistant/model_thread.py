"""One thread for a serving process's model work.

PyTorch's CPU kernels run on an OpenMP team that belongs to the thread calling them. When a
second thread starts computing while the first one's team exists — a new thread per request,
or web-server pool threads after the model was loaded in the main thread — the two teams
share the cores badly: measured on 2 cores, a bf16 decoding step of three candidates took
0.07–0.09 s on the loading thread and 0.12–0.17 s on any other, while one thread doing
everything (loading too) stayed at 0.07–0.08 s.

So ``device serve`` builds its assistant on :data:`MODEL_THREAD` and every request that runs
the model (answers, feedback) is handed to the same thread. Requests queue there, which they
did anyway: the assistant answers one at a time (``Assistant.lock``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ModelThread:
    """A single long-lived worker thread (started on first use) that runs submitted calls in
    order. A call made from the thread itself runs inline (no self-deadlock)."""

    NAME = "fedpersona-model"

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.NAME)
            return self._pool

    @staticmethod
    def inside() -> bool:
        """Whether the caller is the model thread."""
        return threading.current_thread().name.startswith(ModelThread.NAME)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queue ``fn(*args, **kwargs)`` on the model thread."""
        if self.inside():
            done: Future[T] = Future()
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as err:  # handed to the caller through the future
                done.set_exception(err)
            return done
        return self._executor().submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the model thread and wait for its result (or exception)."""
        return self.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Await ``fn`` run on the model thread (the event loop stays free)."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))


MODEL_THREAD = ModelThread()
