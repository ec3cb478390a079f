"""Byzantine-robust aggregation for a stage group's all-reduce, and agreement on round and state. Pure.

What a groupmate sends is not trusted: its pseudo-gradient may be NaN, scaled a
million times, or sent with a weight of 1e6; its claimed round and state hash may be
lies. This module holds the decisions, with no network, clock or randomness
(``now`` is an argument); :mod:`swarmrt.local_sgd.averaging` runs them inside
hivemind's butterfly all-reduce, where every reducer sees every sender's copy of
its part and aggregates that part on its own (BTARD's "butterfly clipping",
Gorbunov et al. 2022).

- :func:`aggregate`: one part from each sender -> the part everybody receives.
  Weights are bounded to 0 or 1 (a joiner that trained nothing sends 0 and is not
  counted; a claimed 1e6 counts once); a non-finite part is left out; with a robust
  rule, a part far from the others (:func:`outliers`) is left out too; the rest go
  through ``mean``, :func:`trimmed_mean` or :func:`centered_clip`.
- :func:`clip_by_norm`: the L2 clipping an honest sender applies to its own
  pseudo-gradient before it sends it.
- :class:`SenderBans`: the senders left out for a bad part, ignored for a while.
- :func:`agree_on_state`: which pre-round (hash, round) a group continues from, by
  majority and the median round, never by the highest claim; which peers may donate it.
- :func:`check_state`: a donor's DiLoCo state (metadata and tensors) against what
  this replica expects, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from swarmrt.local_sgd.config import AGGREGATIONS

__all__ = [
    "AGGREGATIONS", "Aggregate", "Agreement", "OUTLIER_MIN_NUMEL", "SenderBans", "agree_on_state", "aggregate",
    "centered_clip", "check_state", "clip_by_norm", "outliers", "trimmed_mean",
]

OUTLIER_MIN_NUMEL = 1024
"""Parts with fewer values are never called outliers: in few dimensions honest parts scatter
too much for a distance ratio to mean anything (hivemind cuts every tensor into its own parts,
so a bias vector is a part of its own)."""

MAX_CLAIMED_ROUND = 2**53
"""A claimed round at or above this is not a number we can count to: the claim is ignored."""

_TINY = 1e-30


# -- aggregation rules ---------------------------------------------------------------------------


def _stack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    if not parts:
        raise ValueError("aggregation needs at least one part")
    shape = parts[0].shape
    for index, part in enumerate(parts):
        if not isinstance(part, torch.Tensor) or part.shape != shape:
            raise ValueError(f"part {index} has shape {getattr(part, 'shape', None)}, expected {tuple(shape)}")
    return torch.stack([p.detach().to(torch.float32).reshape(-1) for p in parts])


def _median(stacked: torch.Tensor) -> torch.Tensor:
    """Median over the first dimension, the mean of the two middle values for an even count."""
    ordered = stacked.sort(dim=0).values
    n = ordered.shape[0]
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def trim_count(n: int, trim_fraction: float) -> int:
    """How many values :func:`trimmed_mean` drops at each end among ``n``: ``floor(trim_fraction
    x n)`` but at least 1 once there are 3 values (so 3 or 4 senders tolerate one liar), and
    never so many that nothing is left (at most ``(n - 1) // 2``)."""
    if n < 3 or trim_fraction <= 0:
        return 0
    return min((n - 1) // 2, max(1, math.floor(trim_fraction * n)))


def trimmed_mean(parts: Sequence[torch.Tensor], trim_fraction: float) -> torch.Tensor:
    """Coordinate-wise trimmed mean: at every coordinate, drop the :func:`trim_count` lowest and
    highest values and average the rest (Yin et al. 2018). Same shape as a part, float32."""
    stacked = _stack(parts)
    k = trim_count(len(parts), trim_fraction)
    kept = stacked.sort(dim=0).values[k: len(parts) - k]
    return kept.mean(dim=0).reshape(parts[0].shape)


def centered_clip(parts: Sequence[torch.Tensor], radius: float, iterations: int,
                  start: torch.Tensor | None = None) -> torch.Tensor:
    """CenteredClip (Karimireddy, He and Jaggi, ICML 2021): from ``v`` (``start``, by default
    the coordinate-wise median), ``iterations`` times
    ``v <- v + mean_i((x_i - v) * min(1, radius / ||x_i - v||))``: every sender moves the
    estimate by at most ``radius / n``, however far away it is. ``radius`` 0 is chosen per call:
    the median of the senders' distances to the start, so that about half the senders (the
    honest majority's spread) are not clipped at all."""
    stacked = _stack(parts)
    center = _median(stacked) if start is None else start.detach().to(torch.float32).reshape(-1)
    if radius <= 0:
        radius = float(_median((stacked - center).norm(dim=1)))
    for _ in range(iterations):
        diffs = stacked - center
        norms = diffs.norm(dim=1, keepdim=True)
        scale = torch.clamp(radius / norms.clamp_min(_TINY), max=1.0)
        center = center + (diffs * scale).mean(dim=0)
    return center.reshape(parts[0].shape)


def outliers(parts: Sequence[torch.Tensor], factor: float) -> dict[int, str]:
    """Senders whose part lies more than ``factor`` times ``max(median distance, norm of the
    median)`` from the coordinate-wise median (index -> why): far beyond both the senders'
    spread and the size of what they agree on, as a part scaled 1e6x is. The norm term keeps
    honest parts that are merely larger (a peer that trained twice as long, after a rolled-back
    round) from being called outliers when the others happen to be very alike. Nothing with
    fewer than 3 parts (no majority), with ``factor`` 0, or for parts under
    :data:`OUTLIER_MIN_NUMEL` values."""
    if factor <= 0 or len(parts) < 3 or parts[0].numel() < OUTLIER_MIN_NUMEL:
        return {}
    stacked = _stack(parts)
    center = _median(stacked)
    distances = (stacked - center).norm(dim=1)
    scale = max(float(_median(distances)), float(center.norm()), _TINY)
    return {i: f"outlier: {float(d):.3g} from the median, over {factor:g} x {scale:.3g}"
            for i, d in enumerate(distances) if float(d) > factor * scale}


@dataclasses.dataclass(frozen=True)
class Aggregate:
    """What :func:`aggregate` decided for one part."""

    value: torch.Tensor | None
    """The aggregated part (float32, the parts' shape); None when no sender could be used."""
    used: tuple[int, ...]
    """Indices of the senders whose parts went into ``value``."""
    excluded: dict[int, str]
    """Senders left out for cause (index -> why): non-finite part or weight, outlier. Senders
    with weight 0 are neither used nor excluded."""
    reason: str
    """One line: the rule and how many parts it used, or why there was nothing to aggregate."""


def aggregate(parts: Sequence[torch.Tensor], weights: Sequence[float], rule: Any) -> Aggregate:
    """Aggregate one part from each sender (``parts[i]`` with claimed ``weights[i]``) by
    ``rule`` (a ``LocalSGDSection``: ``aggregation``, ``trim_fraction``, ``clip_radius``,
    ``clip_iterations``, ``outlier_factor``).

    A weight is bounded: 0 means "nothing to contribute" (left out, not blamed); any other
    finite weight > 0 counts as 1, so no sender outweighs another; a negative or non-finite
    weight, or a part holding NaN or inf, excludes the sender. With ``trimmed_mean`` or
    ``centered_clip``, :func:`outliers` are excluded too; ``mean`` then stays the plain mean
    of the rest."""
    if len(parts) != len(weights):
        raise ValueError(f"{len(parts)} parts but {len(weights)} weights")
    excluded: dict[int, str] = {}
    candidates = []
    for index, (part, weight) in enumerate(zip(parts, weights)):
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            excluded[index] = f"invalid weight {weight!r}"
        elif weight == 0:
            continue
        elif not bool(torch.isfinite(part).all()):
            excluded[index] = "part holds nan or inf"
        else:
            candidates.append(index)
    if candidates and rule.aggregation != "mean":
        flagged = outliers([parts[i] for i in candidates], rule.outlier_factor)
        excluded.update({candidates[j]: why for j, why in flagged.items()})
        candidates = [i for j, i in enumerate(candidates) if j not in flagged]
    if not candidates:
        zero = len(parts) - len(excluded)
        return Aggregate(None, (), excluded, f"no usable part among {len(parts)} senders "
                                             f"({zero} with weight 0, {len(excluded)} left out)")
    chosen = [parts[i] for i in candidates]
    if rule.aggregation == "trimmed_mean":
        value = trimmed_mean(chosen, rule.trim_fraction)
    elif rule.aggregation == "centered_clip":
        value = centered_clip(chosen, rule.clip_radius, rule.clip_iterations)
    elif rule.aggregation == "mean":
        value = _stack(chosen).mean(dim=0).reshape(chosen[0].shape)
    else:
        raise ValueError(f"unknown aggregation {rule.aggregation!r}; one of {', '.join(AGGREGATIONS)}")
    return Aggregate(value, tuple(candidates), excluded, f"{rule.aggregation} of {len(chosen)} of {len(parts)} parts")


def clip_by_norm(tensors: Sequence[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], float]:
    """Scale ``tensors`` together so that their joint L2 norm is at most ``max_norm`` (0: no
    clipping); returns the (new) tensors and the factor applied (1.0 when nothing changed)."""
    tensors = list(tensors)
    if max_norm <= 0:
        return tensors, 1.0
    norm = math.sqrt(sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in tensors))
    if not math.isfinite(norm) or norm <= max_norm:
        return tensors, 1.0
    factor = max_norm / norm
    return [t * factor for t in tensors], factor


class SenderBans:
    """Senders left out of a part for cause, ignored until ``now >= until`` (keyed by peer id).
    The clock is the caller's: pass the same monotonic ``now`` to every call."""

    def __init__(self, ban_s: float):
        if not ban_s > 0:
            raise ValueError(f"ban_s must be > 0, got {ban_s!r}")
        self.ban_s = ban_s
        self._until: dict[str, tuple[float, str]] = {}

    def ban(self, peer: str, now: float, reason: str) -> None:
        """Ignore ``peer`` for ``ban_s`` seconds from ``now`` (a later ban extends it)."""
        self._until[peer] = (now + self.ban_s, reason)

    def banned(self, peer: str, now: float) -> str | None:
        """Why ``peer`` is banned at ``now``, or None (an expired ban is forgotten)."""
        entry = self._until.get(peer)
        if entry is None:
            return None
        if now >= entry[0]:
            del self._until[peer]
            return None
        return entry[1]


# -- agreement on the round and state ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Agreement:
    """The pre-round state a group continues from, as :func:`agree_on_state` settled it."""

    hash: str | None
    """The agreed params hash (None when no peer made a valid claim)."""
    round: int
    """The agreed round (-1 when no peer made a valid claim)."""
    donors: tuple[str, ...]
    """Peers that claimed exactly this state: after the round they hold the state to download."""
    reason: str
    """How it was settled (majority, or median round), and which claims were ignored."""


def _parse_claim(claim: Any) -> tuple[str, int] | None:
    if not isinstance(claim, Mapping):
        return None
    digest, round_no = claim.get("hash"), claim.get("round")
    if not isinstance(digest, str) or not 0 < len(digest) <= 128:
        return None
    if not isinstance(round_no, int) or isinstance(round_no, bool) or not 0 <= round_no < MAX_CLAIMED_ROUND:
        return None
    return digest, round_no


def agree_on_state(claims: Mapping[str, Any], max_lead: int = 1) -> Agreement:
    """Settle which pre-round ``(hash, round)`` a group continues from, given each peer's claim
    (peer id -> ``{"hash": str, "round": int}``, as gathered; anything else is ignored).

    A state that more than half of the valid claims hold wins. Without such a majority, claims
    more than ``max_lead`` rounds above the lower median round are ignored (a peer that claims
    round 10**9 is not followed), and of the rest the state with the most claims wins, then
    the higher round, then the larger hash. Every groupmate sees the same claims, so every
    groupmate settles on the same state. A liar outvoted by an honest majority changes nothing;
    in a group with no majority (two peers, one of them lying) it can win only by claiming a
    round at most ``max_lead`` ahead."""
    valid = {peer: parsed for peer, claim in claims.items() if (parsed := _parse_claim(claim)) is not None}
    ignored = len(claims) - len(valid)
    note = f"; {ignored} invalid claim(s) ignored" if ignored else ""
    if not valid:
        return Agreement(None, -1, (), "no valid claim" + note)
    counts = Counter(valid.values())
    best, votes = max(counts.items(), key=lambda item: (item[1], item[0][1], item[0][0]))
    if 2 * votes > len(valid):
        reason = f"majority {votes} of {len(valid)}"
    else:
        rounds = sorted(r for _, r in valid.values())
        median = rounds[(len(rounds) - 1) // 2]
        plausible = {state: n for state, n in counts.items() if state[1] <= median + max_lead}
        best, votes = max(plausible.items(), key=lambda item: (item[1], item[0][1], item[0][0]))
        dropped = sum(n for state, n in counts.items() if state not in plausible)
        reason = f"no majority; median round {median}" + (f", {dropped} claim(s) too far ahead ignored" if dropped else "")
    donors = tuple(sorted(peer for peer, state in valid.items() if state == best))
    return Agreement(best[0], best[1], donors, reason + note)


def check_state(metadata: Any, tensors: Sequence[Any], shapes: Sequence[tuple[int, ...]], *,
                min_round: int = 0, max_round: int | None = None,
                hyperparameters: Mapping[str, Any] | None = None) -> None:
    """Raise ``ValueError`` naming what is wrong unless a donor's DiLoCo state (as made by
    ``DiLoCo.export_state``) fits this replica: metadata a dict with an integer ``round`` in
    ``[min_round, max_round]``; ``num_params == len(shapes)``; the tensors the global params
    (``shapes``, in order) and, when ``has_momentum``, one momentum buffer per param of the same
    shapes, all floating point and finite; and, when ``hyperparameters`` are given, the donor's
    (``outer_lr``, ``outer_momentum``, ``nesterov``) equal to them."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"state metadata must be a dict, got {type(metadata).__name__}")
    round_no = metadata.get("round")
    if not isinstance(round_no, int) or isinstance(round_no, bool):
        raise ValueError(f"state round must be an integer, got {round_no!r}")
    top = MAX_CLAIMED_ROUND - 1 if max_round is None else max_round
    if not min_round <= round_no <= top:
        raise ValueError(f"state round {round_no} is outside the expected [{min_round}, {top}]")
    if metadata.get("num_params") != len(shapes):
        raise ValueError(f"state num_params is {metadata.get('num_params')!r}, this replica has {len(shapes)}")
    has_momentum = metadata.get("has_momentum")
    if not isinstance(has_momentum, bool):
        raise ValueError(f"state has_momentum must be true or false, got {has_momentum!r}")
    with_momentum = metadata.get("momentum_params")  # which params carry a momentum buffer
    if with_momentum is None:
        with_momentum = list(range(len(shapes))) if has_momentum else []
    if (not isinstance(with_momentum, list) or any(not isinstance(i, int) or not 0 <= i < len(shapes) for i in with_momentum)):
        raise ValueError(f"state momentum_params must list param indices below {len(shapes)}")
    expected = list(shapes) + [shapes[i] for i in with_momentum]
    if len(tensors) != len(expected):
        raise ValueError(f"state has {len(tensors)} tensors, expected {len(expected)}")
    for index, (tensor, shape) in enumerate(zip(tensors, expected)):
        name = f"global_params[{index}]" if index < len(shapes) else f"momentum[{index - len(shapes)}]"
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"state {name} must be a floating-point tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"state {name} has shape {list(tensor.shape)}, expected {list(shape)}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"state {name} holds nan or inf")
    for key, ours in (hyperparameters or {}).items():
        if metadata.get(key) != ours:
            raise ValueError(f"state {key} is {metadata.get(key)!r}, this replica uses {ours!r}")
