"""Trust nothing a peer says: the trainer's own throughput figures, reply checks and checked work (pure).

Three things a trainer decides about the peers it routes to, each from what it
saw itself, never from what a peer announced:

- **Throughput** (:class:`ThroughputMeter`): samples per second of forward +
  backward, estimated from the forward RPCs this trainer timed (request to
  response, so queueing and the link count too). A peer the trainer has not
  timed yet has no figure (None): routing then gives it SWARM's optimistic
  prior (the fastest measured figure of its stage), so a peer that announces
  1e13 samples/s is tried like any newcomer and then gets what it earns.
- **Replies** (:func:`check_reply`): a reply tensor must have the dtype and
  shape the trainer expects and hold only finite values; anything else is a
  bad reply, and the peer that sent it is banned (the caller's business).
- **Checked work** (:func:`judge`): a fraction of forward hops is re-run on
  another peer of the same stage and the outputs compared by their relative
  L2 gap (:func:`relative_gap`). Peers of a stage do not hold bit-identical
  weights (each applies the gradients it is sent; averaging brings them
  together only now and then), so the tolerance is a relative one, well above
  that drift and well below what a lie does (zeros: gap 1; outputs scaled
  by 2: gap 0.5). Who lied, when two disagree:

  1. a third peer of the stage is asked too, and the majority (outputs within
     tolerance of each other) wins: an outvoted peer whose output is also
     :data:`MARGIN` times farther from every majority member than they are
     from each other is a liar;
  2. with no third peer, the stage's typical output size decides
     (:class:`OutputScale`: the running RMS of outputs that passed a check):
     the peer whose output RMS is off it by more than :data:`SCALE_FACTOR`,
     while the other's is within it, is the liar (zeros, large scalings);
  3. otherwise the mismatch is counted and nobody is banned: with two peers
     and no history a subtle liar cannot be told from an honest peer.

Time and randomness are arguments; nothing here touches the network.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Mapping, Sequence

import torch

SCALE_FACTOR = 10.0
"""Rule 2 of checked work: an output RMS more than this factor off the stage's typical one is a lie
(zeros, large scalings; honest outputs change size as training goes, so the bar is high)."""
MARGIN = 2.0
"""Rule 1 of checked work: a peer outvoted by a majority is a liar only if its output is this many times
farther from each majority member than the majority's members are from each other."""


class BadReply(ValueError):
    """A reply that must not be used; ``reason`` says why (the peer that sent it is to be banned)."""


def check_reply(tensor: torch.Tensor, what: str, shape: Sequence[int] | None, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` if it has ``shape`` and ``dtype`` (None: any) and only finite values, else :class:`BadReply`."""
    if dtype is not None and tensor.dtype != dtype:
        raise BadReply(f"{what}: dtype {str(tensor.dtype).removeprefix('torch.')}, expected "
                       f"{str(dtype).removeprefix('torch.')}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise BadReply(f"{what}: shape {list(tensor.shape)}, expected {list(shape)}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise BadReply(f"{what}: contains NaN or Inf")
    return tensor


def should_check(fraction: float, rng: random.Random) -> bool:
    """Whether to re-run this hop on a second peer (a ``fraction`` of hops, drawn from ``rng``)."""
    return fraction > 0 and rng.random() < fraction


def rms(tensor: torch.Tensor) -> float:
    """Root mean square of ``tensor`` (float64, so huge finite values do not overflow)."""
    if tensor.numel() == 0:
        return 0.0
    return float(tensor.detach().double().pow(2).mean().sqrt())


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / max(||a||, ||b||)`` in float64; 0 for two zero tensors, 1 when one is zero, inf when
    the shapes differ."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.detach().double(), b.detach().double()
    scale = max(float(a.norm()), float(b.norm()))
    if scale == 0.0:
        return 0.0
    return float((a - b).norm()) / scale


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What checked work concluded about one hop."""

    liars: tuple[str, ...]
    """Peers whose output was judged wrong (to be banned)."""
    agreed: bool
    """True when every output agreed within tolerance (nothing to decide)."""
    reason: str
    """Why, in words (for logs and the ban list)."""


class OutputScale:
    """Per stage, the typical RMS of outputs that passed a check (an EMA of its logarithm)."""

    def __init__(self, weight: float = 0.2):
        self.weight = weight
        self._log_rms: dict[int, float] = {}

    def update(self, stage: int, value: float) -> None:
        if not value > 0 or not math.isfinite(value):
            return
        log = math.log(value)
        old = self._log_rms.get(stage)
        self._log_rms[stage] = log if old is None else (1 - self.weight) * old + self.weight * log

    def get(self, stage: int) -> float | None:
        log = self._log_rms.get(stage)
        return None if log is None else math.exp(log)


def _scale_off(value: float, reference: float) -> float:
    """How many times ``value`` is off ``reference`` (>= 1; inf for a zero against a non-zero)."""
    if value <= 0 or reference <= 0:
        return 1.0 if value == reference else math.inf
    return max(value / reference, reference / value)


def judge(outputs: Mapping[str, torch.Tensor], tolerance: float, reference_rms: float | None = None) -> Verdict:
    """Who lied among the peers that computed the same hop (see the module docstring for the rules).

    ``outputs``: peer id -> its output, the first one being the peer the hop was routed to.
    ``reference_rms``: the stage's typical output RMS (:class:`OutputScale`), None if unknown.
    """
    peers = list(outputs)
    if len(peers) < 2:
        return Verdict((), True, "nothing to compare")
    agrees = {p: {q for q in peers if q != p and relative_gap(outputs[p], outputs[q]) <= tolerance} for p in peers}
    if all(len(agrees[p]) == len(peers) - 1 for p in peers):
        return Verdict((), True, f"{len(peers)} outputs agree within {tolerance:g}")
    if len(peers) >= 3:
        # the largest group whose members agree with each other; it must be a strict majority
        best: set[str] = set()
        for p in peers:
            group = {p} | agrees[p]
            if all(q in agrees[r] for q in group for r in group if q != r) and len(group) > len(best):
                best = group
        spread = max((relative_gap(outputs[q], outputs[r]) for q in best for r in best if q < r), default=0.0)
        if 2 * len(best) > len(peers):
            liars = tuple(p for p in peers if p not in best
                          and min(relative_gap(outputs[p], outputs[q]) for q in best) > MARGIN * spread)
            if not liars:
                return Verdict((), False, f"outputs disagree but the outvoted ones are no farther than {MARGIN:g}x "
                                          f"the majority's own spread {spread:.3g}")
            return Verdict(liars, False, f"outputs of {', '.join(liars)} disagree with the majority "
                                         f"({', '.join(sorted(best))}) by more than {tolerance:g}")
        return Verdict((), False, f"{len(peers)} outputs disagree and no majority agrees")
    a, b = peers
    gap = relative_gap(outputs[a], outputs[b])
    if reference_rms is None:
        return Verdict((), False, f"{a} and {b} disagree (gap {gap:.3g}) and the stage has no output history "
                                  "to tell who lied")
    off = {p: _scale_off(rms(outputs[p]), reference_rms) for p in peers}
    for liar, honest in ((a, b), (b, a)):
        if off[liar] > SCALE_FACTOR >= off[honest]:
            return Verdict((liar,), False, f"{liar} disagrees with {honest} (gap {gap:.3g}) and its output RMS is "
                                           f"{off[liar]:.3g}x off the stage's typical {reference_rms:.3g}")
    return Verdict((), False, f"{a} and {b} disagree (gap {gap:.3g}); output sizes do not tell who lied")


class ThroughputMeter:
    """Samples/s of each peer as this trainer measured it (an EMA); None until it has timed the peer.

    A forward RPC of ``samples`` samples that took ``seconds`` counts as
    ``samples * forward_share / seconds`` samples/s of forward + backward
    (a backward costs about two forwards: ``forward_share`` 1/3).
    """

    def __init__(self, forward_share: float = 1.0 / 3.0, weight: float = 0.3):
        self.forward_share = forward_share
        self.weight = weight
        self._rate: dict[str, float] = {}

    def observe_forward(self, peer: str, samples: int, seconds: float) -> None:
        if samples <= 0 or not seconds > 0 or not math.isfinite(seconds):
            return
        rate = samples * self.forward_share / seconds
        old = self._rate.get(peer)
        self._rate[peer] = rate if old is None else (1 - self.weight) * old + self.weight * rate

    def get(self, peer: str) -> float | None:
        return self._rate.get(peer)

    def forget(self, peer: str) -> None:
        self._rate.pop(peer, None)
