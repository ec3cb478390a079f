"""The scheduler's forecast: when each peer computes what, and which activations it holds.

A :class:`Timeline` books, for every microbatch a scheduler has routed, the
compute intervals it will occupy on each peer of its route (forward, loss
head, backward) and, per peer, when the microbatch's activations are freed
(the end of its backward there). Routing a new microbatch asks "if it went
this way, when would each step start?":

- compute: the earliest gap of the right length at or after the ready time
  (insertion, as in HEFT list scheduling; a peer computes one thing at a time);
- memory: a forward may start on a peer at ``t`` only if fewer than
  ``memory`` of the activations booked on it are still held after ``t``.
  This is conservative (it ignores holds that end before ``t`` *and* ignores
  where exactly the new hold would end), which makes it exact: a booking that
  passes the test can never push the peer over its memory at any later time.

Work the timeline did not book (another trainer's microbatches, as the
peers announce it) enters as ``busy_until``: a peer computes nothing of ours
before then.

Transfers are booked as ``links.transfer_s`` (idle-link time): the forecast
ignores uplink contention, which the simulator models; the difference shows up
as predicted vs simulated iteration time.

:func:`forecast_route` walks one route forward and backward through the
timeline without booking it; :meth:`Timeline.book` then books it. Pure: all
times are arguments.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
from typing import Hashable, Sequence

from swarmrt.routing.links import Links
from swarmrt.routing.peer_table import PeerTable

PeerId = Hashable


@dataclasses.dataclass(frozen=True)
class Forecast:
    """When one route's steps would run if booked now."""

    completion: float
    """When the microbatch's last backward (on its origin) ends."""
    compute: tuple[tuple[PeerId, float, float], ...]
    """``(peer, start, end)`` of every compute step, in order."""
    hold_ends: tuple[tuple[PeerId, float], ...]
    """``(peer, end)``: when each peer of the route frees the microbatch's activations."""
    forward_done: float
    """When the forward pass (and the loss) is done."""


class Timeline:
    """Booked compute intervals and activation holds per peer."""

    def __init__(self) -> None:
        self._starts: dict[PeerId, list[float]] = {}
        self._ends: dict[PeerId, list[float]] = {}
        self._holds: dict[PeerId, list[float]] = {}
        self._booked: dict[Hashable, Forecast] = {}
        self.load_s: dict[PeerId, float] = {}
        """Seconds of compute booked on each peer and not yet trimmed (a quick load figure)."""
        self.busy_until: dict[PeerId, float] = {}
        """Peers busy with work this timeline did not book (other trainers' microbatches), until when."""

    def copy(self) -> "Timeline":
        """An independent copy (for trial plans)."""
        return copy.deepcopy(self)

    # --- queries -------------------------------------------------------------------------

    def compute_start(self, peer: PeerId, ready: float, duration: float) -> float:
        """Earliest start >= ``ready`` of a free gap of ``duration`` on ``peer``."""
        if self.busy_until:
            ready = max(ready, self.busy_until.get(peer, ready))
        starts = self._starts.get(peer)
        if not starts:
            return ready
        ends = self._ends[peer]
        t = ready
        for j in range(bisect.bisect_right(ends, ready), len(starts)):
            if t + duration <= starts[j]:
                return t
            if ends[j] > t:
                t = ends[j]
        return t

    def memory_ready(self, peer: PeerId, ready: float, memory: int, now: float, backward_s: float) -> float:
        """Earliest ``t >= ready`` at which fewer than ``memory`` booked activations are held after ``t``.

        A hold whose booked end is already past (``< now``) belongs to a
        microbatch that is late, not finished: it is taken to end no sooner
        than ``now + backward_s``.
        """
        ends = self._holds.get(peer)
        if not ends or len(ends) < memory:
            return ready
        if ends[0] < now:  # late microbatches: their activations are still there
            late = now + backward_s
            ends = sorted(e if e >= now else late for e in ends)
        return max(ready, ends[len(ends) - memory])

    def forward_start(self, peer: PeerId, ready: float, duration: float, memory: int, now: float,
                      backward_s: float) -> float:
        """Earliest start of a forward on ``peer``: a free gap and a free memory slot."""
        return self.compute_start(peer, self.memory_ready(peer, ready, memory, now, backward_s), duration)

    def holds(self, peer: PeerId) -> int:
        """Activations booked on ``peer`` and not yet released."""
        return len(self._holds.get(peer, ()))

    def booked(self, microbatch: Hashable) -> Forecast | None:
        """The forecast booked for ``microbatch``, if any."""
        return self._booked.get(microbatch)

    # --- updates -------------------------------------------------------------------------

    def book(self, microbatch: Hashable, forecast: Forecast) -> None:
        """Book a forecast (replacing whatever ``microbatch`` had booked)."""
        self.release(microbatch)
        for peer, start, end in forecast.compute:
            starts = self._starts.setdefault(peer, [])
            ends = self._ends.setdefault(peer, [])
            i = bisect.bisect_left(starts, start)
            starts.insert(i, start)
            ends.insert(i, end)
            self.load_s[peer] = self.load_s.get(peer, 0.0) + (end - start)
        for peer, end in forecast.hold_ends:
            bisect.insort(self._holds.setdefault(peer, []), end)
        self._booked[microbatch] = forecast

    def release(self, microbatch: Hashable) -> Forecast | None:
        """Forget everything booked for ``microbatch`` (it finished, or was abandoned)."""
        forecast = self._booked.pop(microbatch, None)
        if forecast is None:
            return None
        for peer, start, end in forecast.compute:
            starts = self._starts.get(peer)
            if not starts:
                continue
            i = bisect.bisect_left(starts, start)
            while i < len(starts) and starts[i] == start:
                if self._ends[peer][i] == end:
                    del starts[i]
                    del self._ends[peer][i]
                    self.load_s[peer] = max(0.0, self.load_s.get(peer, 0.0) - (end - start))
                    break
                i += 1
        for peer, end in forecast.hold_ends:
            ends = self._holds.get(peer)
            if ends:
                i = bisect.bisect_left(ends, end)
                if i < len(ends) and ends[i] == end:
                    del ends[i]
        return forecast

    def forget_peer(self, peer: PeerId) -> None:
        """Drop every booking on a peer that is gone (its microbatches are re-routed by their owners)."""
        for d in (self._starts, self._ends, self._holds, self.load_s):
            d.pop(peer, None)

    def trim(self, now: float) -> None:
        """Drop compute intervals that ended before ``now`` (holds stay until released)."""
        for peer in list(self._starts):
            ends = self._ends[peer]
            k = bisect.bisect_right(ends, now)
            if k:
                starts = self._starts[peer]
                self.load_s[peer] = max(0.0, self.load_s.get(peer, 0.0)
                                        - sum(e - s for s, e in zip(starts[:k], ends[:k])))
                del starts[:k]
                del ends[:k]


def forecast_route(timeline: Timeline, table: PeerTable, links: Links, path: Sequence[PeerId],
                   first_stage_is_also_last: bool, ready: float, now: float,
                   done: int = 0, done_at: float | None = None) -> Forecast:
    """When ``path`` (forward visit order, origin first) would run, given ``timeline``'s bookings.

    With stage 0 also last, ``path`` ends with the return to the origin,
    which computes the loss head; otherwise the last peer's forward includes
    the loss and its backward follows. ``done`` > 0 forecasts the rest of a
    route whose first ``done`` hops have finished their forward (the last of
    them at ``done_at``): used to re-plan around a dead peer.
    """
    fwd_hops = list(path[:-1]) if first_stage_is_also_last else list(path)
    compute: list[tuple[PeerId, float, float]] = []
    t = ready if done == 0 else (done_at if done_at is not None else ready)
    for i in range(done, len(fwd_hops)):
        peer = fwd_hops[i]
        info = table.get(peer)
        arrival = t if i == 0 else t + links.transfer_s(fwd_hops[i - 1], peer)
        start = timeline.forward_start(peer, arrival, info.forward_s, info.memory_microbatches, now,
                                       info.backward_s)
        t = start + info.forward_s
        compute.append((peer, start, t))
    if first_stage_is_also_last:
        origin = path[-1]
        info = table.get(origin)
        arrival = t + links.transfer_s(fwd_hops[-1], origin)
        start = timeline.compute_start(origin, arrival, info.head_s)
        t = start + info.head_s
        if info.head_s > 0:
            compute.append((origin, start, t))
        prev = origin
    else:
        prev = fwd_hops[-1]
    forward_done = t
    ends: dict[PeerId, float] = {}
    for peer in reversed(fwd_hops):
        info = table.get(peer)
        arrival = t + links.transfer_s(prev, peer)
        start = timeline.compute_start(peer, arrival, info.backward_s)
        t = start + info.backward_s
        compute.append((peer, start, t))
        ends[peer] = t
        prev = peer
    hold_ends = tuple((p, ends[p]) for p in fwd_hops)
    return Forecast(completion=t, compute=tuple(compute), hold_ends=hold_ends, forward_done=forward_done)
