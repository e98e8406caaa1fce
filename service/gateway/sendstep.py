"""Start a send without awaiting it; hand it, unfinished, to a task only if it must wait.

Why: the fan-out writes one frame to thousands of clients per message and must never
wait for any of them. Awaiting each send costs a task switch per client per frame, and
awaiting none (a task per send) costs a task per client per frame. But an ASGI send to
a socket with room in its buffer never suspends: run one step of the coroutine and it
is done, synchronously. Only a send that would block (the peer is not reading) yields
to the event loop; `resume` then lets a writer task await exactly what it waits for,
as if that task had awaited the send from the start.

The one place the gateway drives a coroutine by hand; tests/test_sendstep.py pins both
paths, and cancellation while handed over.
"""

from __future__ import annotations

import types
from collections.abc import Coroutine, Generator
from typing import Any

DONE = object()
"""What `start` returns for a send that completed at once."""


def start(send: Coroutine[Any, Any, None]) -> object:
    """Run `send` up to its first suspension: `DONE` if it finished, else what it waits on.

    Whatever the send raises is raised here (and the coroutine is closed).
    """
    try:
        waiting_on = send.send(None)
    except StopIteration:
        return DONE
    except BaseException:
        send.close()
        raise
    return waiting_on


@types.coroutine
def resume(send: Coroutine[Any, Any, None], waiting_on: object) -> Generator[Any, Any, None]:
    """Continue a send that suspended in `start`, as if it had been awaited all along.

    Yielding `waiting_on` again makes the awaiting task wait for the same thing; then the
    send is driven to its end. If that wait is cancelled (the send timeout), the send is
    closed.
    """
    try:
        yield waiting_on
    except BaseException:
        send.close()
        raise
    yield from send.__await__()
