"""How long one activation takes to cross the link between two peers.

The scheduler asks "from peer ``u``, how long to each of these peers?" once
per hop, so a link model answers for a whole row at once (``transfer_row``);
the simulator also needs the two parts of a transfer apart, because a node's
uplink is busy only while bytes are being pushed (``serialization_s``) and
not during propagation (``latency_s``).

Three models:

- :class:`MatrixLinks`: full ``latency[i][j]`` and ``bandwidth[i][j]``
  matrices indexed by integer peer id (a scenario file);
- :class:`RegionLinks`: a region per peer and a region-by-region table (the
  1,000-peer generated swarms: O(regions^2) memory instead of O(peers^2));
- :class:`FunctionLinks`: any ``fn(src, dst) -> seconds`` (what a trainer
  has measured, keyed by whatever peer ids it uses).

Transfer time of one activation = latency + activation_bytes / bandwidth +
per_hop_overhead_s (the scenario format's formula, docs/scenarios.md). A peer sending to itself
costs nothing. Pure: numpy only.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np

PeerId = Hashable


class Links:
    """Base: the time to move one activation (or its gradient) from ``src`` to ``dst``."""

    def latency_s(self, src: PeerId, dst: PeerId) -> float:
        """Propagation part: the uplink is free again while it elapses."""
        raise NotImplementedError

    def serialization_s(self, src: PeerId, dst: PeerId) -> float:
        """Bytes / bandwidth + per-hop overhead: the time ``src``'s uplink is busy."""
        raise NotImplementedError

    def transfer_s(self, src: PeerId, dst: PeerId) -> float:
        """Whole transfer time on an idle link."""
        if src == dst:
            return 0.0
        return self.latency_s(src, dst) + self.serialization_s(src, dst)

    def transfer_row(self, src: PeerId, dsts: Sequence[PeerId]) -> np.ndarray:
        """Transfer times from ``src`` to each of ``dsts`` (float64 array)."""
        return np.array([self.transfer_s(src, d) for d in dsts], dtype=np.float64)


class MatrixLinks(Links):
    """Links given as full matrices over integer peer ids ``0..N-1``."""

    def __init__(self, latency_s: np.ndarray, bandwidth_Bps: np.ndarray, activation_bytes: float,
                 per_hop_overhead_s: float = 0.0) -> None:
        lat = np.asarray(latency_s, dtype=np.float64)
        bw = np.asarray(bandwidth_Bps, dtype=np.float64)
        if lat.ndim != 2 or lat.shape[0] != lat.shape[1] or bw.shape != lat.shape:
            raise ValueError(f"latency {lat.shape} and bandwidth {bw.shape} must be equal square matrices")
        n = lat.shape[0]
        off = ~np.eye(n, dtype=bool)
        if np.any(lat[off] < 0) or np.any(bw[off] <= 0):
            raise ValueError("latency must be >= 0 and bandwidth > 0 between distinct peers")
        safe_bw = np.where(off, bw, 1.0)
        self.latency_matrix = np.where(off, lat, 0.0)
        self.bandwidth_matrix = safe_bw
        self._lat = np.where(off, lat, 0.0)
        self._ser = np.where(off, activation_bytes / safe_bw + per_hop_overhead_s, 0.0)
        self._total = self._lat + self._ser
        self.size = n

    def latency_s(self, src: PeerId, dst: PeerId) -> float:
        return float(self._lat[src, dst])

    def serialization_s(self, src: PeerId, dst: PeerId) -> float:
        return float(self._ser[src, dst])

    def transfer_s(self, src: PeerId, dst: PeerId) -> float:
        return float(self._total[src, dst])

    def transfer_row(self, src: PeerId, dsts: Sequence[PeerId]) -> np.ndarray:
        return self._total[src, np.asarray(dsts, dtype=np.int64)]


class RegionLinks(Links):
    """Links given per region pair; peer ``i`` sits in region ``region_of[i]``."""

    def __init__(self, region_of: Sequence[int], latency_s: np.ndarray, bandwidth_Bps: np.ndarray,
                 activation_bytes: float, per_hop_overhead_s: float = 0.0) -> None:
        self.region_of = np.asarray(region_of, dtype=np.int64)
        lat = np.asarray(latency_s, dtype=np.float64)
        bw = np.asarray(bandwidth_Bps, dtype=np.float64)
        if lat.ndim != 2 or lat.shape[0] != lat.shape[1] or bw.shape != lat.shape:
            raise ValueError(f"region latency {lat.shape} and bandwidth {bw.shape} must be equal square matrices")
        if np.any(lat < 0) or np.any(bw <= 0):
            raise ValueError("region latency must be >= 0 and bandwidth > 0 (the diagonal is intra-region)")
        if self.region_of.size and (self.region_of.min() < 0 or self.region_of.max() >= lat.shape[0]):
            raise ValueError("region_of names a region outside the table")
        self._lat = lat
        self._ser = activation_bytes / bw + per_hop_overhead_s
        self._total = self._lat + self._ser
        self.size = int(self.region_of.size)

    def latency_s(self, src: PeerId, dst: PeerId) -> float:
        if src == dst:
            return 0.0
        return float(self._lat[self.region_of[src], self.region_of[dst]])

    def serialization_s(self, src: PeerId, dst: PeerId) -> float:
        if src == dst:
            return 0.0
        return float(self._ser[self.region_of[src], self.region_of[dst]])

    def transfer_s(self, src: PeerId, dst: PeerId) -> float:
        if src == dst:
            return 0.0
        return float(self._total[self.region_of[src], self.region_of[dst]])

    def transfer_row(self, src: PeerId, dsts: Sequence[PeerId]) -> np.ndarray:
        d = np.asarray(dsts, dtype=np.int64)
        row = self._total[self.region_of[src], self.region_of[d]]
        return np.where(d == src, 0.0, row)


class FunctionLinks(Links):
    """Links from measured figures: ``fn(src, dst)`` returns seconds for one activation.

    ``latency_fn`` (optional) splits off the propagation part for the
    simulator; without it the whole transfer counts as uplink time.
    """

    def __init__(self, fn: Callable[[PeerId, PeerId], float],
                 latency_fn: Callable[[PeerId, PeerId], float] | None = None) -> None:
        self._fn = fn
        self._latency_fn = latency_fn

    def latency_s(self, src: PeerId, dst: PeerId) -> float:
        return 0.0 if self._latency_fn is None or src == dst else float(self._latency_fn(src, dst))

    def serialization_s(self, src: PeerId, dst: PeerId) -> float:
        if src == dst:
            return 0.0
        return float(self._fn(src, dst)) - self.latency_s(src, dst)

    def transfer_s(self, src: PeerId, dst: PeerId) -> float:
        return 0.0 if src == dst else float(self._fn(src, dst))
