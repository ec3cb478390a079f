"""DiLoCo local SGD for one stage replica: the outer step and its schedule, pure.

The peers that serve one stage each hold a replica of its parameters. Each
trains on its own with its inner optimizer (AdamW by default); every ``H``
inner steps the group averages the *pseudo-gradient*
``global_params - local_params`` (hivemind's all-reduce, in
``swarmrt.local_sgd.averaging``), and every peer applies the same outer optimizer
step to its copy of the global params, which become its new local params
(DiLoCo, Douillard et al. 2023, Algorithm 1).

Streaming DiLoCo (Douillard et al. 2025), with torchft's semantics for its three
knobs (``[local_sgd]`` ``fragments``, ``sync_delay``, ``alpha``; torchft's
``DiLoCo(model_fragments, sync_every, fragment_sync_delay, fragment_update_alpha)``):

- the parameter tensors are cut into F fragments of about equal size
  (:func:`fragment_bounds`, consecutive tensors); one fragment is synced every
  ``P = H / F`` inner steps, in turn (the fragment is ``round % F``: a failed
  sync is retried on the same fragment), so each is synced every H steps;
- a sync *starts* ``sync_delay`` (tau) inner steps before it is *applied*: at
  step ``P - tau`` of a window the fragment's pseudo-gradient is taken (and the
  runtime starts its all-reduce), at step ``P`` the outer step is applied;
- the applied fragment's local params become ``lerp(new_global, local, alpha)``
  (alpha 0: the new global, dropping the tau steps trained meanwhile; 1: keep local).

With F = 1, tau = 0, alpha = 0 this is plain DiLoCo. This module is the
arithmetic and the schedule only: it keeps the global params (a copy) and the
outer optimizer (``torch.optim.SGD`` with Nesterov momentum, as in the paper:
lr 0.7, momentum 0.9). It never talks to the network and never looks at a
clock; the runtime decides when to call what.

A round, as the runtime drives it::

    if diloco.record_inner_step():             # after each inner optimizer step
        delta = diloco.start_round()           # this fragment's pseudo-gradient
        averaging starts (network, may fail)
    ...
    if diloco.apply_due and the average is in: # sync_delay steps later (at once if 0)
        diloco.apply(averaged)                 # outer step; merge local with the new global
        (or diloco.rollback() if the round failed)

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

__all__ = ["DiLoCo", "fragment_bounds"]


def fragment_bounds(sizes: Sequence[int], fragments: int) -> list[tuple[int, int]]:
    """Cut consecutive tensors of ``sizes`` elements into ``fragments`` runs ``[start, end)`` of
    about equal total size, each holding at least one tensor. Cut ``k`` goes where the running
    total comes closest to ``k / fragments`` of the whole (the earlier index on a tie)."""
    count = len(sizes)
    if fragments < 1 or fragments > count:
        raise ValueError(f"local_sgd.fragments is {fragments}, but the stage has {count} parameter tensors "
                         f"(each fragment needs at least one)")
    running = [0]
    for size in sizes:
        running.append(running[-1] + int(size))
    total = running[-1]
    cuts = [0]
    for k in range(1, fragments):
        target = total * k / fragments
        low, high = cuts[-1] + 1, count - (fragments - k)  # leave a tensor for every later fragment
        cuts.append(min(range(low, high + 1), key=lambda i: (abs(running[i] - target), i)))
    cuts.append(count)
    return list(zip(cuts[:-1], cuts[1:]))


class DiLoCo:
    """Global params, outer optimizer and round schedule of one stage replica.

    ``params`` are the live local parameters (the stage module's), updated in
    place by the inner optimizer; :meth:`apply` and :meth:`load_state_dict`
    overwrite them in place, so the inner optimizer keeps working on the same
    tensors (its state, e.g. AdamW moments, is kept across rounds, as in DiLoCo).

    ``config`` is the run's ``[local_sgd]`` section; DiLoCo reads ``inner_steps`` (H, which
    must be >= 1 here: 0 means local SGD is off), ``outer_lr``, ``outer_momentum``,
    :attr:`~swarmrt.local_sgd.config.LocalSGDSection.uses_nesterov`, ``fragments``,
    ``sync_delay`` and ``alpha``.
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
        self.fragments: list[tuple[int, int]] = fragment_bounds([p.numel() for p in self.params], config.fragments)
        """``[start, end)`` indices into ``params`` of each fragment (one fragment: all of them)."""
        self.global_params: list[torch.Tensor] = [p.detach().clone() for p in self.params]
        self.outer_optimizer = torch.optim.SGD(
            self.global_params,
            lr=self.config.outer_lr,
            momentum=self.config.outer_momentum,
            nesterov=self.config.uses_nesterov,
        )
        self.round = 0
        """Number of outer steps applied (successful fragment syncs), loaded with the state."""
        self.failed_rounds = 0
        """Rounds rolled back by this replica (not part of the shared state)."""
        self.steps_since_sync = 0
        """Inner steps since the last outer step was applied or state was loaded."""
        self.steps_since_attempt = 0
        """Inner steps in the current window: since the last round ended (applied or rolled back)."""
        self.started: int | None = None
        """The fragment whose round was started (:meth:`start_round`) and has not ended yet."""

    # ------------------------------------------------------------------ schedule

    def record_inner_step(self) -> bool:
        """Count one inner optimizer step; True when a round should start (see :attr:`round_due`)."""
        self.steps_since_sync += 1
        self.steps_since_attempt += 1
        return self.round_due

    @property
    def round_due(self) -> bool:
        """True once ``inner_steps / fragments - sync_delay`` inner steps were taken since the last
        round ended and no round is started: time to take a pseudo-gradient and start averaging."""
        return self.started is None and self.steps_since_attempt >= self.config.sync_period - self.config.sync_delay

    @property
    def apply_due(self) -> bool:
        """True once a started round has had its ``sync_delay`` inner steps (``inner_steps /
        fragments`` since the last round ended): time to apply it (or roll it back)."""
        return self.started is not None and self.steps_since_attempt >= self.config.sync_period

    @property
    def fragment(self) -> int:
        """The fragment the next (or the started) round syncs: ``round % fragments``."""
        return self.round % len(self.fragments) if self.started is None else self.started

    @property
    def weight(self) -> float:
        """This replica's weight in the average: 0.0 if it took no inner step since its last
        sync (a peer that just joined or just loaded state has a zero pseudo-gradient and must
        not dilute the others'), else 1.0. The all-reduce divides by the sum of weights, so
        the result is the mean over the peers that trained."""
        return 1.0 if self.steps_since_sync > 0 else 0.0

    # ------------------------------------------------------------------ the round

    @torch.no_grad()
    def pseudo_gradient(self, fragment: int | None = None) -> list[torch.Tensor]:
        """``global - local`` for each parameter of ``fragment`` (default :attr:`fragment`; all
        params with one fragment): new tensors, same dtype and device as the params."""
        start, end = self.fragments[self.fragment if fragment is None else fragment]
        return [g - p.detach() for g, p in zip(self.global_params[start:end], self.params[start:end])]

    def start_round(self) -> list[torch.Tensor]:
        """Start the round of :attr:`fragment`: returns its pseudo-gradient (to average) and marks
        the round started until :meth:`apply` or :meth:`rollback` ends it."""
        if self.started is not None:
            raise RuntimeError(f"DiLoCo: the round of fragment {self.started} is still open")
        delta = self.pseudo_gradient()
        self.started = self.fragment
        return delta

    @torch.no_grad()
    def apply(self, averaged_pseudo_gradient: Sequence[torch.Tensor]) -> None:
        """Outer step on :attr:`fragment`'s global params with the group's averaged
        pseudo-gradient, then that fragment's local params := ``lerp(global, local, alpha)``.

        Raises ``ValueError`` (and changes nothing) if the tensors do not match the fragment's
        params in number or shape, or hold nan/inf (e.g. an all-reduce where every weight was 0).
        Tensors of another dtype or device are converted.
        """
        start, end = self.fragments[self.fragment]
        targets = self.global_params[start:end]
        grads = list(averaged_pseudo_gradient)
        if len(grads) != len(targets):
            raise ValueError(f"averaged pseudo-gradient has {len(grads)} tensors, expected {len(targets)}")
        for index, (grad, param) in enumerate(zip(grads, targets)):
            if not isinstance(grad, torch.Tensor) or grad.shape != param.shape:
                raise ValueError(
                    f"averaged pseudo-gradient [{index}] should have shape {list(param.shape)}, got {_describe(grad)}"
                )
            if not bool(torch.isfinite(grad).all()):
                raise ValueError(f"averaged pseudo-gradient [{index}] holds nan or inf; roll the round back")
        for grad, param in zip(grads, targets):
            param.grad = grad.detach().to(dtype=param.dtype, device=param.device, copy=True)
        self.outer_optimizer.step()  # params without a grad (other fragments) are left alone
        self.outer_optimizer.zero_grad(set_to_none=True)
        alpha = self.config.alpha
        for global_param, local_param in zip(targets, self.params[start:end]):
            local_param.copy_(global_param.lerp(local_param, alpha))  # alpha 0: exactly the global
        self.round += 1
        self.started = None
        self.steps_since_sync = 0
        self.steps_since_attempt = 0

    def rollback(self) -> None:
        """Give up a failed round: global params and outer-optimizer state stay as they were
        (so they stay equal across the group), and the local params are KEPT.

        Keeping them loses no work: the next round's pseudo-gradient ``global - local``
        covers the steps of both rounds (with outer SGD without momentum the trajectory
        is the same as if the failed round had been merged into the next one). Every peer
        of the group rolls back the same way, so they still agree on the global params.
        The round number does not move, so the next round syncs the same fragment, after
        another window of inner steps.
        """
        self.failed_rounds += 1
        self.started = None
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
        self.started = None
        self.steps_since_sync = 0
        self.steps_since_attempt = 0

    def export_state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The state as ``(metadata, tensors)`` for a flat transport such as hivemind's state
        download: tensors are the global params, then the outer optimizer's momentum buffer of
        each param that has one (``momentum_params`` lists which: with fragments, a fragment
        not synced yet has none); metadata is a small msgpack-able dict."""
        buffers = [self.outer_optimizer.state.get(p, {}).get("momentum_buffer") for p in self.global_params]
        with_momentum = [index for index, buffer in enumerate(buffers) if buffer is not None]
        tensors = [g.detach().clone() for g in self.global_params]
        tensors += [buffers[index].detach().clone() for index in with_momentum]
        metadata = {
            "round": self.round,
            "num_params": len(self.global_params),
            "has_momentum": bool(with_momentum),
            "momentum_params": with_momentum,
            "fragments": len(self.fragments),
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
        keys = ("round", "num_params", "has_momentum", "momentum_params", "fragments", "outer_lr", "outer_momentum", "nesterov")
        missing = [k for k in keys if k not in metadata]
        if missing:
            raise ValueError(f"DiLoCo state metadata lacks {missing}")
        if metadata["fragments"] != len(self.fragments):
            raise ValueError(f"DiLoCo state has {metadata['fragments']!r} fragments, this replica uses {len(self.fragments)}")
        tensors = list(tensors)
        count = len(self.global_params)
        with_momentum = metadata["momentum_params"]
        if (not isinstance(with_momentum, list) or not all(_is_index(i, count) for i in with_momentum)
                or len(set(with_momentum)) != len(with_momentum)):
            raise ValueError(f"DiLoCo state momentum_params must list distinct param indices below {count}")
        expected = count + len(with_momentum)
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
        with_momentum = metadata["momentum_params"]
        momentum = {index: {"momentum_buffer": t} for index, t in zip(with_momentum, tensors[count:])}
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


def _is_index(value: Any, count: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return type(value).__name__
