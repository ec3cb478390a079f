"""DiLoCo outer rounds for one stage peer: the glue between the stage worker, the pure
:class:`swarmrt.local_sgd.diloco.DiLoCo` and the stage group's averager.

When DiLoCo's schedule says a round is due (every ``inner_steps / fragments`` inner
steps, ``sync_delay`` steps before it is to be applied), the compute thread takes the
pseudo-gradient of the fragment whose turn it is and hands it to the averaging thread,
then keeps serving microbatches: the round overlaps with training instead of stalling
the pipeline while the group forms and all-reduces. The round is applied on the compute
thread ``sync_delay`` inner steps after it started, as torchft does: the outer optimizer
steps that fragment's global params with the group's average, and its local params
become ``lerp(new global, local, alpha)``. torchft blocks there if the all-reduce has not
finished; a stage peer in a pipeline must not, so a round that returns later is applied
when it returns (same merge). With ``sync_delay = 0`` that is every round.

With ``fragments = F > 1`` the averager carries one flat buffer the size of the largest
fragment (:func:`averaged_templates`), so one sync moves about 1/F of the stage's bytes.

Consistency: every peer of a successful round starts it with the same global
params and outer state and applies the same averaged bytes, so they end it
with identical global params (the hash logged as ``outer round R ok ... hash H``).
Each peer gathers its pre-round hash to the group; a peer that finds itself out
of step with the group (it missed a round, or a round failed only for it)
downloads the global state from a groupmate instead of applying. A failed round
(no group, a peer died mid-all-reduce, timeouts) is rolled back: global params
and outer state stay as they were on every peer, local params are kept.

The arrows: the peer builds the averager (:class:`swarmrt.local_sgd.averaging.StageAverager`)
over :func:`averaged_templates` and hands it to :class:`OuterSync`, which it attaches to the
worker (``worker.attach("outer", outer)``); the worker calls :meth:`OuterSync.after_step`
after each inner step and never knows what local SGD is.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch

from swarmrt.local_sgd.config import LocalSGDSection
from swarmrt.local_sgd.diloco import DiLoCo, fragment_bounds
from swarmrt.local_sgd.robust import agree_on_state
from swarmrt.local_sgd.rounds import Averager, AveragingResult

logger = logging.getLogger(__name__)

__all__ = ["OuterSync", "averaged_templates", "canonical_state"]


class TrainedParams(Protocol):
    """What the outer loop needs of the stage worker."""

    params: list[torch.Tensor]
    """The live parameters the inner optimizer steps (changed in place by the outer loop)."""

    def params_changed(self) -> None:
        """Called on the compute thread after the outer loop changed ``params`` in place."""


def averaged_templates(params: list[torch.Tensor], config: LocalSGDSection) -> list[torch.Tensor]:
    """What the stage group's averager must be built over: the params themselves with one
    fragment, else one flat float32 buffer the size of the largest fragment (each sync packs
    its fragment's pseudo-gradient into it, zero-padded)."""
    if config.fragments == 1:
        return list(params)
    bounds = fragment_bounds([p.numel() for p in params], config.fragments)
    return [torch.zeros(max(sum(p.numel() for p in params[start:end]) for start, end in bounds))]


def canonical_state(gathered: dict[str, Any]) -> tuple[str | None, int]:
    """The pre-round ``(hash, round)`` the group agrees to continue from, by
    :func:`swarmrt.local_sgd.robust.agree_on_state`: the one most peers hold, a majority first;
    without one, claims far above the median round are ignored (a peer claiming round 10**9 is
    not followed), then ties go to the higher round and the larger hash. Every groupmate sees
    the same gathered values, so every groupmate picks the same one."""
    agreed = agree_on_state(gathered)
    return agreed.hash, agreed.round


class OuterSync:
    """DiLoCo's outer loop for one stage peer, overlapped with its inner steps.

    ``worker``: the stage's parameters (:class:`TrainedParams`; a ``StageWorker``).
    ``averager``: the stage group's :class:`~swarmrt.local_sgd.rounds.Averager`; the outer loop
    serves its DiLoCo state through it and shuts it down in :meth:`close` (it owns it).
    ``config``: the run's ``[local_sgd]`` section. ``submit_to_compute(fn, *args)`` runs ``fn``
    on the worker's compute thread (the only thread that touches the parameters); ``log``
    receives one line per round.

    Threads: :meth:`after_step`, :meth:`state_dict`, :meth:`load_state_dict` and applying a
    round run on the compute thread. Only the averager's round runs on the outer loop's own
    thread, on a copy of the pseudo-gradient; it touches neither the parameters nor DiLoCo.
    """

    def __init__(self, worker: TrainedParams, averager: Averager, config: LocalSGDSection, *,
                 submit_to_compute: Callable[..., Any], log: Callable[[str], None] = print):
        self.worker = worker
        self.averager = averager
        self.config = config
        self.submit_to_compute = submit_to_compute
        self.log = log
        self.diloco = DiLoCo(worker.params, config)
        self._flat = config.fragments > 1  # the averager carries one flat buffer (averaged_templates)
        self._flat_size = averaged_templates(worker.params, config)[0].numel() if self._flat else 0
        self._rounds = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="outer-round")
        self._in_flight: object | None = None  # the started round's token (compute thread only)
        self._returned: tuple | None = None  # its result, waiting for DiLoCo.apply_due (compute thread only)
        self._shared_state = self.diloco.export_state()  # what groupmates download; refreshed on the compute thread
        self._state_lock = threading.Lock()
        self.history: collections.deque = collections.deque(maxlen=1000)
        """One dict per round (round, fragment, outcome, group, members, contributors, seconds, hash, pre_hash, error)."""
        self.closed = False
        averager.serve_state(self._state_for_peers)

    # -- called on the compute thread ---------------------------------------------------------
    def after_step(self) -> None:
        """The worker took an inner optimizer step: start a round when one is due, apply the
        started one when its ``sync_delay`` steps have passed and its result is in."""
        if self.diloco.record_inner_step():
            fragment = self.diloco.fragment
            delta = self.diloco.start_round()
            pre_hash, weight, round_no = self.diloco.params_hash(), self.diloco.weight, self.diloco.round
            token = self._in_flight = object()
            self._rounds.submit(self._run_round, token, self._pack(fragment, delta), pre_hash, weight, round_no)
        if self._returned is not None and self.diloco.apply_due:
            self._apply(*self._returned)

    def _round_returned(self, token: object, result: AveragingResult, pre_hash: str, round_no: int) -> None:
        if token is not self._in_flight or self.closed:  # state was loaded meanwhile: the round is moot
            return
        self._returned = (result, pre_hash, round_no)
        if self.diloco.apply_due:
            self._apply(*self._returned)

    @torch.no_grad()
    def _apply(self, result: AveragingResult, pre_hash: str, round_no: int) -> None:
        self._returned = self._in_flight = None
        fragment = self.diloco.fragment
        try:
            if not result.succeeded:
                self.diloco.rollback()
                self._record(round_no, fragment, "rolled back", result, pre_hash)
                return
            agreed = agree_on_state(result.gathered)
            if pre_hash != agreed.hash:
                # out of step with the group: adopt the group's global state (after its groupmates
                # applied this round) instead of applying an average to stale global params
                loaded = self._load_group_state(min_round=agreed.round + 1, donors=agreed.donors)
                if loaded is None:
                    self.diloco.rollback()
                    self._record(round_no, fragment, "out of step; state download failed", result, pre_hash)
                    return
                self.diloco.import_state(*loaded)
                self._record(self.diloco.round, fragment, "out of step; loaded group state", result, pre_hash)
                return
            try:
                self.diloco.apply(self._unpack(fragment, result.tensors))
            except ValueError as error:  # the group's average is unusable: nothing changes
                self.diloco.rollback()
                self._record(round_no, fragment, "rolled back", result, pre_hash, error=str(error))
                return
            self._record(self.diloco.round, fragment, "ok", result, pre_hash)
        finally:
            self.worker.params_changed()
            with self._state_lock:
                self._shared_state = self.diloco.export_state()
            self.averager.state_sharing_priority = float(self.diloco.round)

    def _pack(self, fragment: int, delta: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self._flat:
            return delta
        flat = torch.zeros(self._flat_size)
        joined = torch.cat([d.detach().reshape(-1).float() for d in delta])
        flat[:joined.numel()] = joined
        return [flat]

    def _unpack(self, fragment: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self._flat:
            return tensors
        if len(tensors) != 1 or tensors[0].shape != (self._flat_size,):
            raise ValueError(f"the averaged fragment should be one flat tensor of {self._flat_size} values")
        start, end = self.diloco.fragments[fragment]
        shapes = [p.shape for p in self.worker.params[start:end]]
        parts = torch.split(tensors[0][:sum(s.numel() for s in shapes)], [s.numel() for s in shapes])
        return [part.reshape(shape) for part, shape in zip(parts, shapes)]

    def _load_group_state(self, min_round: int, donors: tuple[str, ...] = ()):
        """Group state of round ``min_round`` or the next (groupmates may still be applying theirs)
        from ``donors`` (the peers that held the agreed state, not whoever claims the highest
        priority), checked before it is loaded (:meth:`DiLoCo.check_import`: finite, our shapes and
        hyperparameters): up to ``state_attempts`` downloads of up to ``state_timeout_s`` each;
        None if none had it."""
        for _ in range(self.config.state_attempts):
            loaded = self.averager.load_state(timeout=self.config.state_timeout_s, donors=donors)
            if loaded is None:
                continue
            try:
                self.diloco.check_import(*loaded, min_round=min_round, max_round=min_round + 1)
            except ValueError as error:
                logger.info("refused a groupmate's DiLoCo state: %s", error)
                continue
            return loaded
        return None

    # -- the averaging thread --------------------------------------------------------------------
    def _run_round(self, token: object, delta, pre_hash: str, weight: float, round_no: int) -> None:
        result = self.averager.average(delta, weight=weight, gather={"hash": pre_hash, "round": round_no})
        if self.closed:
            return
        self.submit_to_compute(self._round_returned, token, result, pre_hash, round_no)

    def _state_for_peers(self):
        with self._state_lock:
            return self._shared_state

    def _record(self, round_no: int, fragment: int, outcome: str, result: AveragingResult, pre_hash: str,
                error: str | None = None) -> None:
        members = ",".join(sorted(peer[-6:] for peer in result.gathered)) or "-"
        error = error or result.error
        entry = {"round": round_no, "fragment": fragment, "outcome": outcome, "group": result.group_size,
                 "members": members, "contributors": result.contributors, "seconds": round(result.seconds, 2),
                 "hash": self.diloco.params_hash(), "pre_hash": pre_hash, "error": error}
        self.history.append(entry)
        # the format of this line is swarmrt.testing.asserts.OUTER_ROUND_OK's contract
        self.log(f"outer round {round_no} {outcome}: group {result.group_size}, contributors {result.contributors}, "
                 f"{result.seconds:.2f} s, hash {entry['hash']}, members {members}" + (f" ({error})" if error else "")
                 + "".join(f"; left out {peer[-6:]}: {why}" for peer, why in sorted(result.excluded.items())))

    # -- state for joiners and checkpoints (the worker saves it under the name it was attached with)
    def state_dict(self) -> dict:
        return self.diloco.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.diloco.load_state_dict(state)
        self._in_flight = self._returned = None  # a round still running is moot now
        with self._state_lock:
            self._shared_state = self.diloco.export_state()
        self.averager.state_sharing_priority = float(self.diloco.round)

    def close(self) -> None:
        """Stop starting and applying rounds and shut the averager down (a running round is abandoned)."""
        self.closed = True
        self._rounds.shutdown(wait=False, cancel_futures=True)
        self.averager.shutdown()
