"""The JetStream stream the gateway reads: created, bounded, only if it is missing.

The stream normally belongs to the Core service; the gateway and `gateway publish` create
it only when it does not exist yet (a fresh demo, a NATS that lost its data) and never
alter one that exists.
"""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

STREAM_MAX_MSGS_PER_SUBJECT = 100
STREAM_MAX_AGE_S = 3600.0


async def ensure_stream(js: JetStreamContext, stream: str, subject: str, replicas: int = 1) -> bool:
    """Create `stream` (bounded, `replicas` copies) if it is missing; never alter one that exists.

    Returns True if this call created it. The stream normally belongs to the Core service.
    """
    try:
        await js.stream_info(stream)
        return False
    except nats.js.errors.NotFoundError:
        pass
    config = StreamConfig(
        name=stream,
        subjects=[subject],
        storage=StorageType.FILE,
        max_msgs_per_subject=STREAM_MAX_MSGS_PER_SUBJECT,
        max_age=STREAM_MAX_AGE_S,
        allow_direct=True,
        num_replicas=replicas,
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        return False  # someone else created it in between: theirs stands
    return True
