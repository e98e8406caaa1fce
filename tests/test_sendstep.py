"""sendstep: a send runs synchronously when it can, and is handed over whole when not."""

from __future__ import annotations

import asyncio

import pytest

from gateway import sendstep

pytestmark = pytest.mark.anyio


async def test_a_send_that_need_not_wait_completes_in_start() -> None:
    """No suspension: start() finishes it, synchronously, and says DONE."""
    done: list[str] = []

    async def send() -> None:
        done.append("sent")

    assert sendstep.start(send()) is sendstep.DONE
    assert done == ["sent"]


async def test_a_send_that_must_wait_is_finished_by_whoever_resumes_it() -> None:
    """A suspended send resumes in a task and ends when what it waited for is ready."""
    gate = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def send() -> None:
        steps.append("started")
        steps.append(await gate)

    coro = send()
    waiting_on = sendstep.start(coro)
    assert waiting_on is not sendstep.DONE
    assert steps == ["started"]

    async def writer() -> None:
        await sendstep.resume(coro, waiting_on)

    task = asyncio.create_task(writer())
    await asyncio.sleep(0)  # the writer is now waiting on the same future
    assert not task.done()
    gate.set_result("finished")
    await asyncio.wait_for(task, 5)
    assert steps == ["started", "finished"]


async def test_a_handed_over_send_is_closed_when_its_wait_is_cancelled() -> None:
    """Cancelling the writer (the send timeout) closes the send: its finally runs."""
    cleaned: list[bool] = []

    async def send() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    coro = send()
    waiting_on = sendstep.start(coro)
    task = asyncio.create_task(_await(sendstep.resume(coro, waiting_on)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


async def test_an_error_in_the_first_step_is_raised_by_start() -> None:
    """A send that fails at once raises from start(), for the hub to drop that client."""

    async def send() -> None:
        raise ConnectionResetError

    with pytest.raises(ConnectionResetError):
        sendstep.start(send())


async def _await(awaitable: object) -> None:
    await awaitable  # type: ignore[misc]
