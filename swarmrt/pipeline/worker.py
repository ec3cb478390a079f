"""The stage worker: one stage's module, its optimizer, and the forward/backward it serves.

No network here: the gRPC servicer (:mod:`swarmrt.pipeline.service`) calls these methods
on a single compute thread, so the module, the gradient accumulators and the
optimizer are only ever touched by one thread.

Backward strategy (SWARM-style recomputation): a forward may keep its autograd
context for a bounded time and memory; a backward that finds no context
(evicted, or the forward ran on another peer that has since died) recomputes
the forward from the stage input the trainer sends along. So a backward hop can
be retried on any peer of the stage, and a microbatch never has to be redone
from the start once its forward pass has finished.

Hostile numbers: a backward's sample count is the number of rows of its input (what a
caller claims is ignored); a microbatch whose parameter gradients are not finite (a 3e38
``grad_output`` overflows them) is dropped and counted (``dropped_nonfinite``), never
added to the accumulators; the accumulated gradient is clipped to
``optimizer.max_grad_norm`` before each step; and a step that would leave a parameter
non-finite stops the peer serving, so the weights a peer serves and hands to joiners stay finite.

Exactly-once: gradients of a microbatch are added to the accumulators only if
the request's deadline has not passed (the trainer retries elsewhere after
its deadline), and a microbatch id seen before is never applied twice here.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import logging
import threading
import time
from typing import Any, Callable, Protocol

import torch
from torch import nn

from swarmrt.config import RunConfig
from swarmrt.pipeline.ledger import LedgerWriter

logger = logging.getLogger(__name__)


class StageError(ValueError):
    """Bad request to a stage; the message says what was wrong."""


class ContextMissing(RuntimeError):
    """The backward found no kept context and no input to recompute from."""


class DeadlineExpired(RuntimeError):
    """The request's deadline passed before its gradients could be applied."""


class Unhealthy(RuntimeError):
    """This worker's parameters are not finite: it serves nothing more (callers go elsewhere)."""


class NonFiniteGradients(StageError):
    """A backward whose parameter gradients are not finite: counted, never applied."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a stage accepts: dtype and the shape after the batch dimensions."""

    dtype: torch.dtype
    batch_dims: int
    trailing: tuple[int, ...]

    def check(self, x: torch.Tensor, what: str) -> None:
        if x.dtype != self.dtype:
            raise StageError(f"{what}: dtype {str(x.dtype).removeprefix('torch.')} but this stage takes "
                             f"{str(self.dtype).removeprefix('torch.')}")
        if x.dim() != self.batch_dims + len(self.trailing) or tuple(x.shape[self.batch_dims:]) != self.trailing:
            want = ["B"] + ["T"] * (self.batch_dims - 1) + list(self.trailing)
            raise StageError(f"{what}: shape {list(x.shape)} but this stage takes [{', '.join(map(str, want))}]")
        if x.shape[0] == 0:
            raise StageError(f"{what}: empty batch")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise StageError(f"{what}: contains NaN or Inf")


@dataclasses.dataclass(frozen=True)
class InputSpecs:
    """A stage that takes one of several inputs, told apart by dtype (stage 0 of a model with tied
    ends takes token ids and, for its head, hidden states)."""

    specs: tuple[InputSpec, ...]

    @property
    def batch_dims(self) -> int:
        """The batch dimensions, the same for every input (the batch's, and the sequence's for text)."""
        return self.specs[0].batch_dims

    def check(self, x: torch.Tensor, what: str) -> None:
        spec = next((s for s in self.specs if s.dtype == x.dtype), self.specs[0])
        spec.check(x, what)


def infer_input_spec(layers_before: list[nn.Module], sample: torch.Tensor) -> InputSpec:
    """Run a one-sample input through the earlier layers to learn this stage's input spec."""
    x = sample
    with torch.no_grad():
        for layer in layers_before:
            x = layer(x)
    batch_dims = 2 if sample.dtype == torch.long else 1  # text: [B, T, ...]; regression: [B, ...]
    return InputSpec(dtype=x.dtype, batch_dims=batch_dims, trailing=tuple(x.shape[batch_dims:]))


@dataclasses.dataclass
class _Context:
    input: torch.Tensor
    output: torch.Tensor
    created: float
    nbytes: int
    forward_s: float
    epoch: int
    loss_grad: torch.Tensor | None = None
    """The gradient of the loss this peer computed from the output (the last hop of a chained route)."""


class StageExtension(Protocol):
    """Something that runs beside a stage worker and follows its steps and state (DiLoCo's
    outer loop does). Attached with :meth:`StageWorker.attach`; the worker never needs to
    know what it is. Every call comes on the worker's compute thread."""

    def after_step(self) -> None:
        """The worker just took an inner optimizer step (its parameters changed)."""

    def state_dict(self) -> Any:
        """This extension's part of the stage's state (joiners, checkpoints); tensors and plain data."""

    def load_state_dict(self, state: Any) -> None:
        """Adopt a part saved by :meth:`state_dict`. Called before the worker loads the module, so
        parameters it sets are then overwritten by the donor's own."""

    def close(self) -> None:
        """The worker is closing."""


@dataclasses.dataclass
class PendingBackward:
    """A microbatch's gradients, computed and checked but not applied yet (:meth:`StageWorker.gradients`)."""

    microbatch_id: str
    grad_input: torch.Tensor | None
    param_grads: tuple
    samples: int
    """Rows of the input (what the throughput figure counts)."""
    counted: int
    """Samples this microbatch adds to the step (0 for a tied head's pass)."""
    seconds: float
    """Compute time of its forward (when kept) and backward."""


_STATE_KEYS = frozenset({"stage", "module", "optimizer", "version", "samples_applied"})


def make_optimizer(params, config: RunConfig) -> torch.optim.Optimizer:
    opt = config.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


def _tensors_in(value: Any, name: str = "state") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts and lists, with its path (``state.module.0.weight``)."""
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _tensors_in(item, f"{name}.{key}")]
    if isinstance(value, (list, tuple)):
        return [found for index, item in enumerate(value) for found in _tensors_in(item, f"{name}.{index}")]
    return []


class StageWorker:
    def __init__(self, module: nn.Module, config: RunConfig, stage: int, spec: InputSpec | InputSpecs,
                 clock: Callable[[], float] = time.monotonic, compute_delay_s: float = 0.0,
                 slowdown: float = 1.0, ledger_path: str | None = None):
        self.module = module
        self.config = config
        self.stage = stage
        self.spec = spec
        self.clock = clock
        self.compute_delay_s = compute_delay_s
        self.slowdown = slowdown
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, config) if self.params else None  # a stage may hold no weights
        self.contexts: collections.OrderedDict[str, _Context] = collections.OrderedDict()
        self.context_bytes = 0
        self.applied: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.samples_pending = 0
        self.version = 0
        self.samples_applied = 0
        self.microbatches_applied = 0
        self.dropped_nonfinite = 0
        """Backwards whose parameter gradients were not finite: dropped, never applied."""
        self.steps_skipped = 0
        """Optimizer steps skipped because the accumulated gradient was not finite."""
        self.announce_throughput: float | None = None
        """A rehearsal hook (a byzantine ``throughput`` lie): the figure :meth:`stats` reports instead of the
        measured one. Trainers route by what they measure themselves, so the lie gains nothing."""
        self.broken: str | None = None
        """Why this worker's parameters cannot be trusted (non-finite); it then serves nothing."""
        self.throughput = 0.0  # samples/s of forward+backward, EMA
        self.extensions: dict[str, StageExtension] = {}  # by name, the key of their state (see attach)
        self.epoch = 0  # bumped whenever parameters change in place; kept contexts of older epochs are stale
        self._ledger = LedgerWriter(ledger_path) if ledger_path else None
        self._lock = threading.Lock()  # guards counters read by other threads (Info, heartbeats)

    # -- helpers -----------------------------------------------------------------------------
    def _delay(self, started: float) -> None:
        """Emulated compute time: a fixed delay and/or a slowdown factor (benchmarks, fault tests).

        The factor multiplies the whole compute time, real and emulated: a call that computed for
        ``t`` seconds takes ``slowdown * (t + compute_delay_s)`` in all, so a slowed peer (or stage)
        is ``slowdown`` times slower even when ``--compute-delay`` dominates its compute."""
        elapsed = self.clock() - started
        extra = self.slowdown * (self.compute_delay_s + elapsed) - elapsed
        if extra > 0:
            time.sleep(extra)

    def _evict(self, now: float) -> None:
        ttl, cap = self.config.network.context_ttl_s, self.config.network.context_max_mb * 2**20
        while self.contexts:
            mb, ctx = next(iter(self.contexts.items()))
            if now - ctx.created <= ttl and self.context_bytes <= cap:
                break
            self.contexts.popitem(last=False)
            self.context_bytes -= ctx.nbytes

    def _observe(self, samples: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = samples / seconds
        with self._lock:
            self.throughput = rate if self.throughput == 0 else 0.8 * self.throughput + 0.2 * rate

    # -- the two calls ----------------------------------------------------------------------
    def forward(self, microbatch_id: str, x: torch.Tensor, keep_context: bool) -> torch.Tensor:
        if self.broken:
            raise Unhealthy(self.broken)
        self.spec.check(x, "input")
        started = self.clock()
        if keep_context:
            x_in = x.detach().requires_grad_(x.is_floating_point())
            with torch.enable_grad():
                out = self.module(x_in)
        else:
            with torch.no_grad():
                out = self.module(x)
        self._delay(started)
        elapsed = self.clock() - started
        if keep_context:
            nbytes = (x.nelement() * x.element_size() + out.nelement() * out.element_size()) * max(1, len(self.module))
            self._evict(self.clock())
            old = self.contexts.pop(microbatch_id, None)
            if old is not None:
                self.context_bytes -= old.nbytes
            self.contexts[microbatch_id] = _Context(x_in, out, self.clock(), nbytes, elapsed, self.epoch)
            self.context_bytes += nbytes
            self._evict(self.clock())
        return out.detach()

    def forward_loss(self, microbatch_id: str, x: torch.Tensor, target: torch.Tensor, keep_context: bool) -> float:
        """Forward, then the loss against ``target`` here (the last hop of a chained route): the loss summed
        over the microbatch's samples. With ``keep_context`` the loss's gradient is kept for the backward
        (``gradients(..., grad_output=None)``). Bad labels (shape, dtype, NaN, ids out of the vocabulary)
        are a :class:`StageError`."""
        from swarmrt.data import loss_sum  # the run's loss, exactly as the trainer computes it

        out = self.forward(microbatch_id, x, keep_context)
        if target.shape[0] != out.shape[0]:
            raise StageError(f"target: {target.shape[0]} samples for an output of {out.shape[0]}")
        if target.is_floating_point() and not torch.isfinite(target).all():
            raise StageError("target: contains NaN or Inf")
        output = out.requires_grad_(keep_context)
        with torch.enable_grad():
            loss = loss_sum(self.config.data, output, target)
            if not torch.isfinite(loss):
                raise StageError(f"target: the loss is not finite ({float(loss)})")
            kept = self.contexts.get(microbatch_id) if keep_context else None
            if kept is not None:  # (an over-full context store may have evicted it already: recomputed then)
                (kept.loss_grad,) = torch.autograd.grad(loss, output)
        return float(loss.detach())

    def backward(self, microbatch_id: str, grad_output: torch.Tensor, x: torch.Tensor | None, samples: int | None,
                 need_grad_input: bool, deadline: float | None) -> tuple[torch.Tensor | None, bool]:
        """Returns ``(grad_input, stepped)``. Raises DeadlineExpired without applying anything, and
        :class:`NonFiniteGradients` (nothing applied) when the parameter gradients are not finite.

        ``samples`` (what the caller claims) is ignored: the microbatch counts as many samples as
        its input has rows. The two halves, :meth:`gradients` then :meth:`apply`, can be called apart
        (a chained backward applies only after the next peer answered)."""
        pending = self.gradients(microbatch_id, grad_output, x, need_grad_input)
        return pending.grad_input, self.apply(pending, deadline)

    def gradients(self, microbatch_id: str, grad_output: torch.Tensor | None, x: torch.Tensor | None,
                  need_grad_input: bool) -> "PendingBackward":
        """The first half of :meth:`backward`: this microbatch's gradients, checked, nothing applied yet.
        ``grad_output`` None: the gradient of the loss :meth:`forward_loss` kept."""
        if self.broken:
            raise Unhealthy(self.broken)
        if grad_output is None:
            kept = self.contexts.get(microbatch_id)
            if kept is None or kept.loss_grad is None:
                raise ContextMissing(f"no kept loss gradient for microbatch {microbatch_id}")
            grad_output = kept.loss_grad
        if not torch.isfinite(grad_output).all():
            raise StageError("grad_output: contains NaN or Inf")
        started = self.clock()
        ctx = self.contexts.pop(microbatch_id, None)
        forward_s = 0.0
        if ctx is not None:
            self.context_bytes -= ctx.nbytes
            if x is None:
                x = ctx.input.detach()
        if ctx is not None and ctx.epoch == self.epoch:
            x_in, out, forward_s = ctx.input, ctx.output, ctx.forward_s
        elif x is not None:
            # recompute: the forward ran elsewhere, its context was evicted, or an optimizer
            # step or outer round since then changed the weights its autograd graph saved
            self.spec.check(x, "input")
            x_in = x.detach().requires_grad_(x.is_floating_point())
            with torch.enable_grad():
                out = self.module(x_in)
        else:
            raise ContextMissing(f"no kept context for microbatch {microbatch_id} and no input to recompute from")
        if tuple(grad_output.shape) != tuple(out.shape) or grad_output.dtype != out.dtype:
            raise StageError(f"grad_output: shape {list(grad_output.shape)} {grad_output.dtype} does not match "
                             f"the output {list(out.shape)} {out.dtype}")
        samples = int(x_in.shape[0])  # derived from the input, never from the request
        wants_input = need_grad_input and x_in.is_floating_point()
        targets = ([x_in] if wants_input else []) + self.params
        grads = torch.autograd.grad(out, targets, grad_output, allow_unused=True)
        grad_input = grads[0] if wants_input else None
        param_grads = grads[1:] if wants_input else grads
        if not all(g is None or bool(torch.isfinite(g).all()) for g in param_grads):
            with self._lock:
                self.dropped_nonfinite += 1
            raise NonFiniteGradients(f"microbatch {microbatch_id}: parameter gradients are not finite "
                                     f"(grad_output max |g| {float(grad_output.abs().max()):.3g}); dropped, not applied")
        self._delay(started)
        counts = getattr(self.module, "counts_samples", None)  # models.layers.TiedEnds: the head's pass does not
        return PendingBackward(microbatch_id, None if grad_input is None else grad_input.detach(), param_grads,
                               samples, samples if counts is None or counts(x_in) else 0,
                               forward_s + (self.clock() - started))

    def apply(self, pending: "PendingBackward", deadline: float | None) -> bool:
        """The second half of :meth:`backward`: add ``pending``'s gradients to the accumulators unless
        ``deadline`` has passed (:class:`DeadlineExpired`, nothing applied) or this microbatch was applied
        here before (nothing applied again); step when enough samples are in. True when it stepped."""
        microbatch_id = pending.microbatch_id
        again = microbatch_id in self.applied  # asked again (its first answer was lost): nothing to apply
        if deadline is not None and self.clock() > deadline and not again:
            raise DeadlineExpired(f"microbatch {microbatch_id}: deadline passed before applying")
        stepped = False
        counted = pending.counted
        if not again:
            for p, g in zip(self.params, pending.param_grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)
            self.applied[microbatch_id] = None
            while len(self.applied) > 100_000:
                self.applied.popitem(last=False)
            with self._lock:
                self.samples_pending += counted
                self.samples_applied += counted
                self.microbatches_applied += 1 if counted else 0
            if self._ledger is not None:
                self._ledger.applied(self.stage, microbatch_id)
            if counted and self.samples_pending >= self.config.optimizer.samples_per_step:
                self._step()
                stepped = True
        self._observe(pending.samples, pending.seconds)
        return stepped

    def _step(self) -> None:
        scale = 1.0 / self.samples_pending
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        if self.config.optimizer.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.optimizer.max_grad_norm)
        if self.optimizer is not None:
            self._guarded_step()
        self.params_changed()
        with self._lock:
            self.samples_pending = 0
            self.version += 1
        for extension in self.extensions.values():
            extension.after_step()
        if self.extensions:  # an extension (the outer loop) may have sent the new parameters out
            self._ledger_shared()

    def _guarded_step(self) -> None:
        """The optimizer step, skipped (and counted) when the clipped gradient is not finite. A step
        that still leaves a parameter non-finite marks the worker :attr:`broken`: it then refuses
        to compute or hand out its state, so NaN weights are never served."""
        if all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.params):
            schedule = self.config.optimizer
            if schedule.scheduled:  # warmup / decay by the stage's step count, which joiners take over
                for group in self.optimizer.param_groups:
                    group["lr"] = schedule.lr_at(self.version)
            self.optimizer.step()
            if not self.params_finite():
                self.broken = f"stage {self.stage}: an optimizer step left parameters non-finite"
                logger.error("%s; this peer stops serving", self.broken)
        else:
            with self._lock:
                self.steps_skipped += 1
        self.optimizer.zero_grad(set_to_none=True)

    def params_finite(self) -> bool:
        """True when every parameter and buffer of the stage is finite."""
        return all(bool(torch.isfinite(t).all()) for t in itertools.chain(self.module.parameters(), self.module.buffers())
                   if t.is_floating_point())

    def params_changed(self) -> None:
        """Call (on the compute thread) after changing parameters in place."""
        self.epoch += 1

    def attach(self, name: str, extension: StageExtension) -> None:
        """Run ``extension`` beside this worker: it is told of every inner step, its state travels
        with the stage's under ``name`` (e.g. ``"outer"``), and it is closed with the worker."""
        if not name or name in _STATE_KEYS or name in self.extensions:
            raise ValueError(f"extension name {name!r} is taken or empty; "
                             f"taken: {sorted(_STATE_KEYS | set(self.extensions))}")
        self.extensions[name] = extension

    # -- state for joiners and checkpoints ------------------------------------------------------
    def state_bytes(self) -> bytes:
        if self.broken or not self.params_finite():  # never hand non-finite weights to a joiner or a checkpoint
            raise Unhealthy(f"stage {self.stage}: parameters are not finite; refusing to serve this state")
        buffer = io.BytesIO()
        torch.save({"stage": self.stage, "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                    "version": self.version, "samples_applied": self.samples_applied,
                    **{name: extension.state_dict() for name, extension in self.extensions.items()}}, buffer)
        self._ledger_shared()
        return buffer.getvalue()

    def _ledger_shared(self) -> None:
        """Mark in the ledger that this stage's state may now live on outside this process (served
        to a joiner, checkpointed, averaged); see :mod:`swarmrt.pipeline.ledger`."""
        if self._ledger is not None:
            self._ledger.shared(self.stage)

    def load_state_bytes(self, data: bytes) -> None:
        state = torch.load(io.BytesIO(data), weights_only=True)
        if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
            raise StageError("state: not a stage state (no module weights)")
        if state.get("stage") != self.stage:
            raise StageError(f"state is for stage {state.get('stage')}, this peer serves stage {self.stage}")
        bad = [name for name, t in _tensors_in(state) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:  # checked before anything is loaded: a refused state leaves this peer as it was
            raise StageError(f"donor state holds nan or inf in {', '.join(bad[:3])}")
        for name, extension in self.extensions.items():
            if state.get(name) is not None:  # e.g. DiLoCo's global params + outer momentum (local := global)
                extension.load_state_dict(state[name])
        self.module.load_state_dict(state["module"])  # the donor's own parameters, on top
        if self.optimizer is not None:
            own = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict(state["optimizer"])
            for group, hyperparameters in zip(self.optimizer.param_groups, own):
                group.update(hyperparameters)  # the donor's moments, this peer's own lr, betas, decay
        self.params_changed()
        with self._lock:
            self.version = int(state["version"])

    def stats(self) -> dict:
        with self._lock:
            throughput = self.throughput if self.announce_throughput is None else self.announce_throughput
            return {"throughput": throughput, "version": self.version, "samples_applied": self.samples_applied,
                    "microbatches_applied": self.microbatches_applied, "dropped_nonfinite": self.dropped_nonfinite,
                    "steps_skipped": self.steps_skipped}

    def close(self) -> None:
        for extension in self.extensions.values():
            extension.close()
        if self._ledger is not None:
            self._ledger.close()
