"""DiLoCo local SGD for one stage replica: the outer step, pure.

The peers that serve one stage each hold a replica of its parameters. Each
trains on its own with its inner optimizer (AdamW by default) for ``H`` inner
steps; then the group averages the *pseudo-gradient*
``global_params - local_params`` (hivemind's all-reduce, in
``swarmrt.local_sgd.averaging``), and every peer applies the same outer optimizer
step to its copy of the global params, which become its new local params
(DiLoCo, Douillard et al. 2023, Algorithm 1).

This module is the arithmetic only: it keeps the global params (a copy) and
the outer optimizer (``torch.optim.SGD`` with Nesterov momentum, as in the
paper: lr 0.7, momentum 0.9), computes the pseudo-gradient and applies an
averaged one. It never talks to the network and never looks at a clock; the
runtime decides when to call what.

A round, as the runtime drives it::

    if diloco.record_inner_step():             # after each inner optimizer step
        delta = diloco.pseudo_gradient()
        ok, averaged = average(delta, weight=diloco.weight)   # network, may fail
        if ok:
            diloco.apply(averaged)             # outer step; local params := global
        else:
            diloco.rollback()                  # nothing changes; see rollback()

Consistency: peers that start a round with the same global params and outer
state and apply the same averaged pseudo-gradient end it with the same global
params and outer state, bit for bit (same torch build, same device).
:meth:`DiLoCo.params_hash` makes that visible in logs and tests. A peer whose
round failed while others succeeded holds stale global params and must load
state from a peer (:meth:`DiLoCo.load_state_dict`) before its next round.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from swarmrt.local_sgd.config import LocalSGDSection
from swarmrt.local_sgd.robust import check_state

__all__ = ["DiLoCo"]


class DiLoCo:
    """Global params, outer optimizer and round bookkeeping of one stage replica.

    ``params`` are the live local parameters (the stage module's), updated in
    place by the inner optimizer; :meth:`apply` and :meth:`load_state_dict`
    overwrite them in place, so the inner optimizer keeps working on the same
    tensors (its state, e.g. AdamW moments, is kept across rounds, as in DiLoCo).

    ``config`` is the run's ``[local_sgd]`` section; DiLoCo reads ``inner_steps`` (H, which
    must be >= 1 here: 0 means local SGD is off), ``outer_lr``, ``outer_momentum`` and
    :attr:`~swarmrt.local_sgd.config.LocalSGDSection.uses_nesterov`.
    """

    def __init__(self, params: Iterable[torch.Tensor], config: LocalSGDSection):
        if not isinstance(config, LocalSGDSection):
            raise TypeError(f"DiLoCo config must be a LocalSGDSection, got {type(config).__name__}")
        if config.inner_steps < 1:
            raise ValueError(f"local_sgd.inner_steps is {config.inner_steps}: local SGD is off; DiLoCo needs H >= 1")
        self.config = config
        self.params: list[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("DiLoCo needs at least one parameter tensor")
        for index, param in enumerate(self.params):
            if not isinstance(param, torch.Tensor) or not param.is_floating_point():
                raise ValueError(f"DiLoCo params[{index}] must be a floating-point tensor, got {_describe(param)}")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("DiLoCo params must not repeat a tensor")
        self.global_params: list[torch.Tensor] = [p.detach().clone() for p in self.params]
        self.outer_optimizer = torch.optim.SGD(
            self.global_params,
            lr=self.config.outer_lr,
            momentum=self.config.outer_momentum,
            nesterov=self.config.uses_nesterov,
        )
        self.round = 0
        """Number of outer steps applied (successful rounds), loaded with the state."""
        self.failed_rounds = 0
        """Rounds rolled back by this replica (not part of the shared state)."""
        self.steps_since_sync = 0
        """Inner steps since local params were last set to the global ones (apply or load)."""
        self.steps_since_attempt = 0
        """Inner steps since the last round, successful or rolled back."""

    # ------------------------------------------------------------------ schedule

    def record_inner_step(self) -> bool:
        """Count one inner optimizer step; True when a round is due (see :attr:`round_due`)."""
        self.steps_since_sync += 1
        self.steps_since_attempt += 1
        return self.round_due

    @property
    def round_due(self) -> bool:
        """True once ``inner_steps`` inner steps were taken since the last round."""
        return self.steps_since_attempt >= self.config.inner_steps

    @property
    def weight(self) -> float:
        """This replica's weight in the average: 0.0 if it took no inner step since its last
        sync (a peer that just joined or just loaded state has a zero pseudo-gradient and must
        not dilute the others'), else 1.0. The all-reduce divides by the sum of weights, so
        the result is the mean over the peers that trained."""
        return 1.0 if self.steps_since_sync > 0 else 0.0

    # ------------------------------------------------------------------ the round

    @torch.no_grad()
    def pseudo_gradient(self) -> list[torch.Tensor]:
        """``global - local`` per parameter (new tensors, same dtype and device as the params)."""
        return [g - p.detach() for g, p in zip(self.global_params, self.params)]

    @torch.no_grad()
    def apply(self, averaged_pseudo_gradient: Sequence[torch.Tensor]) -> None:
        """Outer step with the group's averaged pseudo-gradient, then local params := global.

        Raises ``ValueError`` (and changes nothing) if the tensors do not match the params
        in number or shape, or hold nan/inf (e.g. an all-reduce where every weight was 0).
        Tensors of another dtype or device are converted.
        """
        grads = list(averaged_pseudo_gradient)
        if len(grads) != len(self.global_params):
            raise ValueError(f"averaged pseudo-gradient has {len(grads)} tensors, expected {len(self.global_params)}")
        for index, (grad, param) in enumerate(zip(grads, self.global_params)):
            if not isinstance(grad, torch.Tensor) or grad.shape != param.shape:
                raise ValueError(
                    f"averaged pseudo-gradient [{index}] should have shape {list(param.shape)}, got {_describe(grad)}"
                )
            if not bool(torch.isfinite(grad).all()):
                raise ValueError(f"averaged pseudo-gradient [{index}] holds nan or inf; roll the round back")
        for grad, param in zip(grads, self.global_params):
            param.grad = grad.detach().to(dtype=param.dtype, device=param.device, copy=True)
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        self._copy_global_to_local()
        self.round += 1
        self.steps_since_sync = 0
        self.steps_since_attempt = 0

    def rollback(self) -> None:
        """Give up a failed round: global params and outer-optimizer state stay as they were
        (so they stay equal across the group), and the local params are KEPT.

        Keeping them loses no work: the next round's pseudo-gradient ``global - local``
        covers the steps of both rounds (with outer SGD without momentum the trajectory
        is the same as if the failed round had been merged into the next one). Every peer
        of the group rolls back the same way, so they still agree on the global params.
        The next round is due after another ``inner_steps`` inner steps.
        """
        self.failed_rounds += 1
        self.steps_since_attempt = 0

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Global params, outer-optimizer state and round number (copies), for joiners and
        checkpoints. Local params and the inner optimizer are the caller's to save."""
        return {
            "round": self.round,
            "global_params": [g.detach().clone() for g in self.global_params],
            "outer_optimizer": _clone_tensors(self.outer_optimizer.state_dict()),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt another replica's state; local params := the loaded global params.

        Raises ``ValueError`` if the params differ in number or shape, or the outer
        optimizer was configured differently (lr, momentum, nesterov)."""
        for key in ("round", "global_params", "outer_optimizer"):
            if key not in state:
                raise ValueError(f"DiLoCo state lacks {key!r}")
        loaded = list(state["global_params"])
        if len(loaded) != len(self.global_params):
            raise ValueError(f"DiLoCo state has {len(loaded)} global params, expected {len(self.global_params)}")
        for index, (tensor, param) in enumerate(zip(loaded, self.global_params)):
            if not isinstance(tensor, torch.Tensor) or tensor.shape != param.shape:
                raise ValueError(f"DiLoCo state global_params[{index}]: expected shape {list(param.shape)}, got {_describe(tensor)}")
        groups = state["outer_optimizer"].get("param_groups", [])
        for field, ours in (("lr", self.config.outer_lr), ("momentum", self.config.outer_momentum), ("nesterov", self.config.uses_nesterov)):
            theirs = [group.get(field) for group in groups]
            if theirs != [ours]:
                raise ValueError(f"DiLoCo state: outer optimizer {field} is {theirs}, this replica uses [{ours!r}]")
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        for tensor, param in zip(loaded, self.global_params):
            param.copy_(tensor)
        self._copy_global_to_local()
        self.round = int(state["round"])
        self.steps_since_sync = 0
        self.steps_since_attempt = 0

    def export_state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The state as ``(metadata, tensors)`` for a flat transport such as hivemind's state
        download: tensors are the global params, then (once the outer optimizer has momentum)
        one momentum buffer per param; metadata is a small msgpack-able dict."""
        buffers = [self.outer_optimizer.state.get(p, {}).get("momentum_buffer") for p in self.global_params]
        has_momentum = all(b is not None for b in buffers)
        tensors = [g.detach().clone() for g in self.global_params]
        if has_momentum:
            tensors += [b.detach().clone() for b in buffers]
        metadata = {
            "round": self.round,
            "num_params": len(self.global_params),
            "has_momentum": has_momentum,
            "outer_lr": self.config.outer_lr,
            "outer_momentum": self.config.outer_momentum,
            "nesterov": self.config.uses_nesterov,
        }
        return metadata, tensors

    def check_import(self, metadata: Any, tensors: Sequence[torch.Tensor], *, min_round: int = 0,
                     max_round: int | None = None) -> None:
        """Raise ``ValueError`` naming what is wrong unless ``(metadata, tensors)`` from another
        replica (:meth:`export_state`) fits this one: every metadata key, this replica's param
        count, shapes and outer hyperparameters, finite floating-point tensors, a round in
        ``[min_round, max_round]`` (:func:`swarmrt.local_sgd.robust.check_state`). Changes nothing."""
        if not isinstance(metadata, dict):
            raise ValueError(f"DiLoCo state metadata must be a dict, got {type(metadata).__name__}")
        missing = [k for k in ("round", "num_params", "has_momentum", "outer_lr", "outer_momentum", "nesterov") if k not in metadata]
        if missing:
            raise ValueError(f"DiLoCo state metadata lacks {missing}")
        tensors = list(tensors)
        count = len(self.global_params)
        expected = count * (2 if metadata["has_momentum"] else 1)
        if metadata["num_params"] != count or len(tensors) != expected:
            raise ValueError(
                f"DiLoCo state has {metadata['num_params']} params and {len(tensors)} tensors, "
                f"this replica expects {count} params and {expected} tensors"
            )
        for field, key, ours in (("lr", "outer_lr", self.config.outer_lr), ("momentum", "outer_momentum", self.config.outer_momentum),
                                 ("nesterov", "nesterov", self.config.uses_nesterov)):
            if metadata[key] != ours:
                raise ValueError(f"DiLoCo state: outer optimizer {field} is [{metadata[key]!r}], this replica uses [{ours!r}]")
        check_state(metadata, tensors, [tuple(p.shape) for p in self.global_params], min_round=min_round, max_round=max_round)

    def import_state(self, metadata: dict[str, Any], tensors: Sequence[torch.Tensor], *, min_round: int = 0,
                     max_round: int | None = None) -> None:
        """Adopt the state made by :meth:`export_state` on another replica, once
        :meth:`check_import` found nothing wrong (same errors); the outer optimizer keeps this
        replica's own hyperparameters (only momentum buffers are taken)."""
        self.check_import(metadata, tensors, min_round=min_round, max_round=max_round)
        tensors = list(tensors)
        count = len(self.global_params)
        groups = self.outer_optimizer.state_dict()["param_groups"]  # ours: lr, momentum, nesterov
        momentum = {i: {"momentum_buffer": t} for i, t in enumerate(tensors[count:])}
        self.load_state_dict(
            {
                "round": metadata["round"],
                "global_params": tensors[:count],
                "outer_optimizer": {"state": momentum, "param_groups": groups},
            }
        )

    def params_hash(self) -> str:
        """16 hex digits over the global params and the outer-optimizer momentum (bytes,
        dtypes and shapes): equal on every peer after a successful round. The round number
        is not hashed; log it beside the hash."""
        digest = hashlib.blake2b(digest_size=8)
        state = self.outer_optimizer.state
        for param in self.global_params:
            _hash_tensor(digest, param)
            buffer = state.get(param, {}).get("momentum_buffer")
            if buffer is None:
                digest.update(b"no-momentum")
            else:
                _hash_tensor(digest, buffer)
        return digest.hexdigest()

    @torch.no_grad()
    def _copy_global_to_local(self) -> None:
        for global_param, local_param in zip(self.global_params, self.params):
            local_param.copy_(global_param)


def _hash_tensor(digest: "hashlib._Hash", tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.numel():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def _clone_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _clone_tensors(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clone_tensors(item) for item in value]
    return value


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return type(value).__name__
