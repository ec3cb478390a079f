"""One averaging round as the outer loop sees it: what an averager returns and what it must offer.

:class:`swarmrt.local_sgd.averaging.StageAverager` (hivemind) is the implementation;
:class:`swarmrt.local_sgd.outer.OuterSync` only needs the :class:`Averager` protocol,
so its unit tests hand it a scripted fake. No hivemind, network or clock here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

__all__ = ["Averager", "AveragingResult", "StateProvider"]

StateProvider = Callable[[], tuple[Any, Sequence[torch.Tensor]]]
"""Returns ``(metadata, tensors)`` for a peer that downloads state: metadata a small
msgpack-able object, tensors a list (DiLoCo's :meth:`~swarmrt.local_sgd.diloco.DiLoCo.export_state`)."""


@dataclasses.dataclass(frozen=True)
class AveragingResult:
    """The outcome of one averaging round, as seen by this peer."""

    succeeded: bool
    """True if ``tensors`` holds the group's average (the same bytes on every peer that succeeded)."""
    group_size: int
    """Peers in the group (0 if no group formed)."""
    contributors: int
    """Peers of the group that averaged with a weight > 0."""
    tensors: list[torch.Tensor] | None
    """The averaged tensors (float32, CPU, owned by the caller) on success, else None."""
    gathered: dict[str, Any]
    """Peer id (base58) -> what that peer passed as ``gather``; empty if no group formed."""
    error: str | None
    """Why the round failed (None on success)."""
    seconds: float
    """Wall time of the round on this peer."""
    excluded: dict[str, str] = dataclasses.field(default_factory=dict)
    """Peer id (base58) -> why this peer's reducers left that sender's parts out of the round
    (nan/inf, a bad weight or shape, an outlier, or banned after an earlier such round)."""


class Averager(Protocol):
    """What the outer loop needs from the stage group's averager."""

    state_sharing_priority: float
    """Peers download state from the donor with the highest priority (the outer loop sets its round)."""

    def average(self, tensors: Sequence[torch.Tensor], weight: float = 1.0, gather: Any = None) -> AveragingResult:
        """Average ``tensors`` with the group (weight 0: contribute nothing); ``gather`` reaches every
        groupmate. Blocks for the round, bounded by the ``[local_sgd]`` timeouts; never raises for
        network trouble (a failed round is a result)."""

    def load_state(self, timeout: float | None = None,
                   donors: Sequence[str] | None = None) -> tuple[Any, list[torch.Tensor]] | None:
        """Download ``(metadata, tensors)`` from a groupmate that serves state (only from ``donors``,
        peer ids in order, when given); None if none could."""

    def serve_state(self, provider: StateProvider | None) -> None:
        """Serve ``provider()`` to peers that download state from now on."""

    def shutdown(self) -> None:
        """Stop averaging (the outer loop owns its averager and calls this when it closes)."""
