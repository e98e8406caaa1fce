"""Noticing another process pulling from our consumer: what leases cannot prevent.

A consumer forced on two processes (leases off with one `GATEWAY_DURABLE`, or an older
gateway beside a new one) splits the messages between them, silently. JetStream numbers
each consumer's deliveries; a process that alone pulls sees them without gaps.
"""

from __future__ import annotations


class ShareDetector:
    """Notices another process pulling from our consumer: its deliveries are missing here.

    JetStream gives each delivery of a consumer the next consumer sequence. When this
    process alone pulls, the sequences it sees are consecutive; a delivery lost in transit
    (a reconnect) leaves one gap, so only repeated gaps count: `GAPS` within `WINDOW_S`,
    outside the `GRACE_S` after a reconnect.
    """

    GAPS = 3
    WINDOW_S = 30.0
    GRACE_S = 5.0
    CLEAR_S = 60.0  # this long without a gap ends the alarm

    def __init__(self) -> None:
        self.shared = False
        self._last_seq = 0
        self._gaps: list[float] = []
        self._quiet_until = 0.0
        self._last_gap = 0.0

    def reset(self, now: float, *, reconnected: bool = False) -> None:
        """Forget the sequence: a new binding, or a reconnect (whose lost deliveries, and
        their redeliveries, may leave gaps for a while: those are not counted)."""
        self._last_seq = 0
        self._gaps.clear()
        self._quiet_until = now + self.GRACE_S if reconnected else now

    def observe(self, delivery_seq: int, now: float) -> bool | None:
        """Note one delivery; True when sharing is first seen, False when it ends, else None."""
        last, self._last_seq = self._last_seq, delivery_seq
        if last and delivery_seq > last + 1 and now >= self._quiet_until:
            self._last_gap = now
            self._gaps = [t for t in self._gaps if now - t <= self.WINDOW_S] + [now]
            if not self.shared and len(self._gaps) >= self.GAPS:
                self.shared = True
                return True
        elif self.shared and now - self._last_gap > self.CLEAR_S:
            self.shared = False
            self._gaps.clear()
            return False
        return None
