"""The network loop's call wrapper: a coroutine's own timeout keeps its message; a call that
overruns its limit says so and is cancelled."""

from __future__ import annotations

import asyncio

import pytest

from peer.net import loop as loop_module
from peer.net.loop import NetLoop, set_or_done


@pytest.fixture
def net():
    loop = NetLoop("test-net")
    loop.start()
    yield loop
    loop.stop()


def test_a_coroutines_own_timeout_keeps_its_message(net):
    async def slow_download():
        raise TimeoutError("no state of round >= 3 within the deadline: donor 9f3a refused")

    with pytest.raises(TimeoutError, match="donor 9f3a refused"):
        net.call(slow_download(), 5)


def test_a_coroutine_late_by_its_own_deadline_still_answers(net, monkeypatch):
    """As after a SIGSTOP: the caller's limit passed, the coroutine ends by itself soon after."""
    monkeypatch.setattr(loop_module, "LATE_GRACE_S", 2.0)

    async def late():
        await asyncio.sleep(0.5)
        return "done"

    assert net.call(late(), 0.1) == "done"


def test_a_call_past_its_limit_is_cancelled_and_says_so(net, monkeypatch):
    monkeypatch.setattr(loop_module, "LATE_GRACE_S", 0.2)
    cancelled = asyncio.Event()

    async def forever():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError, match="did not finish within 0.2 s"):
        net.call(forever(), 0.2)   # after the limit and the grace for a frozen process

    async def was_cancelled():
        await asyncio.wait_for(cancelled.wait(), 5)
        return True

    assert net.call(was_cancelled(), 10)


def test_set_or_done_returns_at_the_first_and_leaves_the_future_alone():
    async def body():
        event, future = asyncio.Event(), asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(set_or_done(event, future))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        event.set()
        await asyncio.wait_for(waiting, 1)
        assert not future.done(), "the watched future is not cancelled"
        future.set_exception(RuntimeError("its owner takes this"))
        await asyncio.wait_for(set_or_done(asyncio.Event(), future), 1)   # a done future returns at once
        assert isinstance(future.exception(), RuntimeError)

    asyncio.run(body())
