"""The one asyncio loop (uvloop where available) in one background thread, and the
`Deadline` type every network-side wait uses. Runs coroutines; never blocks the trainer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
# A process that was frozen (SIGSTOP, a suspended VM) wakes up with every deadline past: the
# coroutine's own deadlines get this long to end it before the caller's limit cancels it.
LATE_GRACE_S = 10.0


class Deadline:
    """An absolute point in monotonic time; `left()` is what a wait may still take."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def left(self, floor: float = 0.0) -> float:
        return max(floor, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def sub(self, seconds: float) -> Deadline:
        """A deadline at most `seconds` away and never later than this one."""
        d = Deadline(seconds)
        d.at = min(d.at, self.at)
        return d


async def set_or_done(event: asyncio.Event, future: asyncio.Future) -> None:
    """Returns once `event` is set or `future` is done, whichever first. `future` is only watched:
    never cancelled, nor its result or exception taken (its owner does that)."""
    if event.is_set() or future.done():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter, future], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.new_event_loop()


class NetLoop:
    """Owns the background event loop thread; `submit` hands it a coroutine from any thread."""

    def __init__(self, name: str = "net"):
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self._fatal: concurrent.futures.Future = concurrent.futures.Future()   # set by `fail`

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("network loop did not start within 10 s")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float, abortable: bool = True) -> T:
        """Runs `coro` on the loop and waits for it from another thread, at most `timeout_s`."""
        return self.wait(self.submit(coro), timeout_s, abortable)

    def wait(self, fut: concurrent.futures.Future[T], timeout_s: float, abortable: bool = True) -> T:
        """The result of a submitted coroutine, waited for at most `timeout_s` (plus a short grace
        for one that is finishing); cancels it and raises TimeoutError past that. After `fail(e)`,
        cancels it and raises e at once (unless not `abortable`: what a stopping peer still does)."""
        watch = (fut, self._fatal) if abortable else (fut,)
        for wait_s in (timeout_s, LATE_GRACE_S):
            concurrent.futures.wait(watch, wait_s, concurrent.futures.FIRST_COMPLETED)
            if fut.done():
                return fut.result()   # the coroutine's own TimeoutError keeps its cause
            if abortable and self._fatal.done():
                fut.cancel()
                raise self._fatal.exception()
        fut.cancel()
        raise TimeoutError(f"network call did not finish within {timeout_s:.1f} s") from None

    def fail(self, error: BaseException) -> None:
        """From any thread: every `call` and `wait`, now and later, raises `error` (the first one given)
        instead of waiting on: the network found that this peer cannot go on (a refused run secret)."""
        if not self._fatal.done():
            self._fatal.set_exception(error)

    @property
    def failed(self) -> BaseException | None:
        return self._fatal.exception() if self._fatal.done() else None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancels every task still on the loop, stops it and joins the thread, which then closes it:
        at most about timeout_s in all. A task or a loop that will not end is logged and left behind
        (the thread is a daemon); stop what must end cleanly (servers, channels) before this."""
        if not self._thread.is_alive():
            return
        deadline = Deadline(timeout_s)

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=deadline.left() / 2)
                if pending:
                    log.warning("%d network tasks did not end when cancelled: %s", len(pending),
                                ", ".join(sorted(t.get_name() for t in pending)))

        try:
            self.call(_cancel_all(), deadline.left(0.1), abortable=False)
        except Exception as e:  # the loop is going away either way
            log.debug("cancelling network tasks: %s", e)
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # closed already: the thread is ending by itself
            pass
        self._thread.join(deadline.left(0.1))
        if self._thread.is_alive():
            log.warning("the network loop did not stop within %.1f s; leaving it behind", timeout_s)
