"""A worker's turn (``_Turn``): the FIFO lock that serializes calls on one worker."""

from __future__ import annotations

import asyncio

import pytest

from tensorline.server.runtime.sandbox._records import _Turn


async def test_turns_are_taken_first_come_first_served() -> None:
    turn = _Turn()
    assert turn.try_acquire() and turn.locked() and not turn.try_acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        await turn.acquire()
        order.append(i)
        await asyncio.sleep(0)
        turn.release()

    tasks = [asyncio.ensure_future(take(i)) for i in range(5)]
    await asyncio.sleep(0)
    turn.release()
    # Handed over, never free in between: nobody can barge in.
    assert turn.locked() and not turn.try_acquire()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4] and not turn.locked()
    with pytest.raises(RuntimeError):
        turn.release()


async def test_a_cancelled_waiter_passes_the_turn_on() -> None:
    turn = _Turn()
    await turn.acquire()
    first = asyncio.ensure_future(turn.acquire())
    second = asyncio.ensure_future(turn.acquire())
    third = asyncio.ensure_future(turn.acquire())
    await asyncio.sleep(0)
    second.cancel()  # cancelled while waiting: leaves the queue
    turn.release()  # handed to `first`...
    first.cancel()  # ...which is cancelled before it runs: `third` gets it
    await asyncio.gather(first, second, return_exceptions=True)
    await asyncio.wait_for(third, 5.0)
    assert turn.locked()
    turn.release()
    assert not turn.locked()
