"""The ``[local_sgd]`` section of the run config: every knob of DiLoCo and its averaging, once.

One frozen dataclass, one docstring under each field, one validation in
``__post_init__`` (torchtitan's habit). Its consumers read it directly:

- :class:`swarmrt.local_sgd.diloco.DiLoCo` takes ``inner_steps``, ``outer_lr``,
  ``outer_momentum``, :attr:`LocalSGDSection.uses_nesterov` and the Streaming DiLoCo knobs
  ``fragments``, ``sync_delay`` and ``alpha``;
- :class:`swarmrt.local_sgd.averaging.StageAverager` takes the group size and
  the timeouts, plus :attr:`LocalSGDSection.request_timeout_s`, derived here;
- :class:`swarmrt.local_sgd.outer.OuterSync` takes ``inner_steps`` (through
  DiLoCo) and the state-download limits (:attr:`LocalSGDSection.state_timeout_s`,
  :attr:`LocalSGDSection.state_attempts`).

The all-reduce's codecs are keys of ``[compression]`` (``pseudo_gradients``,
``state``) next to the pipeline's codecs; :data:`ALLREDUCE_CODECS` is the one
list of what they may be, and :func:`check_allreduce_codec` the one check.

Pure: no clock, no network, no process; errors are ``ValueError`` naming the key
(``swarmrt.config`` turns them into ``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from swarmrt.wire.codecs import CODEC_NAMES

AGGREGATIONS: tuple[str, ...] = ("mean", "trimmed_mean", "centered_clip")
"""What ``local_sgd.aggregation`` may name (the rules are in :mod:`swarmrt.local_sgd.robust`)."""

__all__ = ["ALLREDUCE_CODECS", "LocalSGDSection", "check_allreduce_codec"]

ALLREDUCE_CODECS: tuple[str, ...] = ("none", "fp16", "int8", "int8_blockwise")
"""swarmrt codec names (see :mod:`swarmrt.wire.codecs`) that hivemind's all-reduce can carry.
``int8`` is hivemind's uniform 8-bit (clips beyond 3 sigma); ``int8_blockwise`` needs
bitsandbytes on every peer of the group. ``bf16`` and ``topk`` have no hivemind counterpart
(and a sum of sparse vectors is not sparse)."""


def check_allreduce_codec(name: Any, key: str) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``name`` is in :data:`ALLREDUCE_CODECS`."""
    if isinstance(name, str) and name in ALLREDUCE_CODECS:
        return
    takes = ", ".join(ALLREDUCE_CODECS)
    if isinstance(name, str) and name.partition(":")[0] in CODEC_NAMES:
        raise ValueError(f"{key}: codec {name!r} cannot be used in hivemind's all-reduce; it takes {takes}")
    raise ValueError(f"{key}: unknown codec {name!r}; the all-reduce takes {takes}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"local_sgd.{key}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class LocalSGDSection:
    """DiLoCo across the peers of each stage (Douillard et al. 2023): every ``inner_steps`` inner
    optimizer steps a stage group all-reduces its pseudo-gradients and takes an outer step."""

    inner_steps: int = 0
    """H: inner optimizer steps between outer averaging rounds of a stage group; 0 disables averaging."""
    outer_lr: float = 0.7
    """Outer (Nesterov SGD) learning rate, applied to the averaged pseudo-gradient."""
    outer_momentum: float = 0.9
    """Outer momentum (0: plain outer SGD; with outer_lr 1 that is plain parameter averaging)."""
    nesterov: bool = True
    """Nesterov momentum for the outer step. With outer_momentum 0 there is no momentum to look
    ahead with and this has no effect (see :attr:`uses_nesterov`)."""
    min_group_size: int = 2
    """A round needs at least this many peers of the stage; fewer is a failed (rolled back) round."""
    matchmaking_time_s: float = 3.0
    """How long peers gather into a group before the all-reduce starts."""
    matchmaking_timeout_s: float = 15.0
    """Give up forming a group after this long (the round is rolled back)."""
    next_chunk_timeout_s: float = 2.0
    """A groupmate that sends no next chunk within this long is dropped (a dead peer cannot stall the round)."""
    allreduce_timeout_s: float = 20.0
    """An all-reduce takes at most this long once the group has formed."""
    fragments: int = 1
    """F (Streaming DiLoCo): the stage's parameter tensors are cut into F fragments of about equal
    size (consecutive tensors), synced one at a time in turn, one every ``inner_steps / F`` inner
    steps, so each fragment is synced every ``inner_steps`` and one sync carries about 1/F of the
    bytes. ``inner_steps`` must be a multiple of F; 1 is plain DiLoCo."""
    sync_delay: int = 0
    """tau: inner steps between starting a fragment's sync (its pseudo-gradient is taken and the
    all-reduce starts) and applying it (the outer step and the merge); the all-reduce overlaps
    them. Must be below ``inner_steps / fragments``. torchft's ``fragment_sync_delay``."""
    alpha: float = 0.0
    """How a synced fragment's local params merge with its new global params:
    ``local := (1 - alpha) * global + alpha * local`` (0: take the new global, 1: keep local).
    torchft's ``fragment_update_alpha``."""

    state_timeout_s: ClassVar[float] = 10.0
    """Fixed, not a key: the longest one download of a groupmate's DiLoCo state may take (a peer
    that finds itself out of step with its group catches up this way)."""
    state_attempts: ClassVar[int] = 5
    """Fixed, not a key: downloads an out-of-step peer tries before it gives up on a round
    (groupmates may still be applying the round it wants)."""

    # -- robust averaging (swarmrt.local_sgd.robust): what a groupmate sends is not trusted
    aggregation: str = "mean"
    """How each reducer of the all-reduce combines the senders' copies of its part: ``mean``,
    ``trimmed_mean`` (coordinate-wise, ``trim_fraction``) or ``centered_clip`` (Karimireddy et al.
    2021; ``clip_radius``, ``clip_iterations``). Whatever the rule, weights count 0 or 1 and a part
    holding nan/inf is left out (its sender banned for ``sender_ban_s``) instead of failing the round."""
    trim_fraction: float = 0.25
    """``trimmed_mean``: the share of values dropped at each end of every coordinate (at least one
    value from 3 senders on, never all): the share of liars a group tolerates."""
    clip_radius: float = 0.0
    """``centered_clip``: how far (L2, per part) one sender may pull the estimate; 0 chooses it per
    part as the median distance of the senders from their coordinate-wise median."""
    clip_iterations: int = 5
    """``centered_clip``: clipping iterations, from the coordinate-wise median."""
    outlier_factor: float = 10.0
    """``trimmed_mean``/``centered_clip``: a sender whose part lies farther from the coordinate-wise
    median than this many times both the median distance and the median's own norm is left out and
    banned; 0 turns this off."""
    clip_norm: float = 0.0
    """Before sending, a peer scales its pseudo-gradient down to at most this L2 norm; 0: no clipping."""
    sender_ban_s: float = 600.0
    """A sender left out of a part for cause (nan/inf, bad weight, outlier) is ignored in later
    rounds on this peer for this long."""

    def __post_init__(self) -> None:
        _require(_is_int(self.inner_steps) and self.inner_steps >= 0, "inner_steps",
                 f"must be an integer >= 0, got {self.inner_steps!r}")
        _require(_is_real(self.outer_lr) and self.outer_lr > 0, "outer_lr",
                 f"must be a finite number > 0, got {self.outer_lr!r}")
        _require(_is_real(self.outer_momentum) and 0 <= self.outer_momentum < 1, "outer_momentum",
                 f"must be in [0, 1), got {self.outer_momentum!r}")
        _require(isinstance(self.nesterov, bool), "nesterov", f"must be true or false, got {self.nesterov!r}")
        _require(_is_int(self.min_group_size) and self.min_group_size >= 1, "min_group_size",
                 f"must be an integer >= 1, got {self.min_group_size!r}")
        for key in ("matchmaking_time_s", "matchmaking_timeout_s", "next_chunk_timeout_s", "allreduce_timeout_s"):
            value = getattr(self, key)
            _require(_is_real(value) and value > 0, key, f"must be a finite number of seconds > 0, got {value!r}")
        _require(self.matchmaking_timeout_s > self.matchmaking_time_s, "matchmaking_timeout_s",
                 f"must exceed local_sgd.matchmaking_time_s ({self.matchmaking_time_s}), got {self.matchmaking_timeout_s}")
        _require(_is_int(self.fragments) and self.fragments >= 1, "fragments",
                 f"must be an integer >= 1, got {self.fragments!r}")
        _require(_is_int(self.sync_delay) and self.sync_delay >= 0, "sync_delay",
                 f"must be an integer >= 0, got {self.sync_delay!r}")
        _require(_is_real(self.alpha) and 0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha!r}")
        if self.inner_steps > 0:
            _require(self.inner_steps % self.fragments == 0, "fragments",
                     f"must divide local_sgd.inner_steps ({self.inner_steps}), got {self.fragments}")
            _require(self.sync_delay < self.sync_period, "sync_delay",
                     f"must be below local_sgd.inner_steps / local_sgd.fragments ({self.sync_period}): a fragment's "
                     f"sync must end before the next one starts, got {self.sync_delay}")
        _require(self.allreduce_timeout_s > 2 * self.next_chunk_timeout_s, "allreduce_timeout_s",
                 f"must exceed 2 x local_sgd.next_chunk_timeout_s ({self.next_chunk_timeout_s}) so a dead "
                 f"groupmate is dropped before the round times out, got {self.allreduce_timeout_s}")
        _require(self.aggregation in AGGREGATIONS, "aggregation",
                 f"must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        _require(_is_real(self.trim_fraction) and 0 < self.trim_fraction < 0.5, "trim_fraction",
                 f"must be in (0, 0.5), got {self.trim_fraction!r}")
        _require(_is_real(self.clip_radius) and self.clip_radius >= 0, "clip_radius",
                 f"must be a finite number >= 0 (0: automatic), got {self.clip_radius!r}")
        _require(_is_int(self.clip_iterations) and 1 <= self.clip_iterations <= 100, "clip_iterations",
                 f"must be an integer in [1, 100], got {self.clip_iterations!r}")
        _require(_is_real(self.outlier_factor) and (self.outlier_factor == 0 or self.outlier_factor > 1),
                 "outlier_factor", f"must be 0 (off) or a finite number > 1, got {self.outlier_factor!r}")
        _require(_is_real(self.clip_norm) and self.clip_norm >= 0, "clip_norm",
                 f"must be a finite number >= 0 (0: no clipping), got {self.clip_norm!r}")
        _require(_is_real(self.sender_ban_s) and self.sender_ban_s > 0, "sender_ban_s",
                 f"must be a finite number of seconds > 0, got {self.sender_ban_s!r}")

    @property
    def enabled(self) -> bool:
        """True when stage groups average (``inner_steps > 0``)."""
        return self.inner_steps > 0

    @property
    def sync_period(self) -> int:
        """Inner steps between two fragment syncs: ``inner_steps // fragments``."""
        return self.inner_steps // self.fragments

    @property
    def uses_nesterov(self) -> bool:
        """Whether the outer SGD uses Nesterov momentum: ``nesterov`` and ``outer_momentum > 0``.
        Every replica's outer optimizer is built with this, and state is exchanged with it."""
        return self.nesterov and self.outer_momentum > 0

    @property
    def request_timeout_s(self) -> float:
        """How long a peer waits for a group leader's answer while matchmaking: half of
        ``matchmaking_time_s``, at most 3 s. Derived, not a key: hivemind needs it below the
        matchmaking time, or matchmaking can deadlock."""
        return min(3.0, self.matchmaking_time_s / 2)
