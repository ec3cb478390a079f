"""DiLoCo outer rounds for one stage peer: the glue between the stage worker, the pure
:class:`swarmrt.local_sgd.diloco.DiLoCo` and the stage group's averager.

Every ``local_sgd.inner_steps`` inner optimizer steps, the compute thread
snapshots the pseudo-gradient (global - local) and hands it to the averaging
thread, then keeps serving microbatches: the round overlaps with training
instead of stalling the pipeline while the group forms and all-reduces. When
the round returns, the compute thread applies it: the outer optimizer steps the
global params with the group's average, and the local params become the new
global params plus whatever the peer trained while the round was running
(its drift since the snapshot), so no inner step is lost. A round that is due
while the previous one still runs is skipped (rolled back at once).

Consistency: every peer of a successful round starts it with the same global
params and outer state and applies the same averaged bytes, so they end it
with identical global params (the hash logged as ``outer round R ok ... hash H``).
Each peer gathers its pre-round hash to the group; a peer that finds itself out
of step with the group (it missed a round, or a round failed only for it)
downloads the global state from a groupmate instead of applying. A failed round
(no group, a peer died mid-all-reduce, timeouts) is rolled back: global params
and outer state stay as they were on every peer, local params are kept.

The arrows: the peer builds the averager (:class:`swarmrt.local_sgd.averaging.StageAverager`)
and hands it to :class:`OuterSync`, which it attaches to the worker
(``worker.attach("outer", outer)``); the worker calls :meth:`OuterSync.after_step`
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
from swarmrt.local_sgd.diloco import DiLoCo
from swarmrt.local_sgd.robust import agree_on_state
from swarmrt.local_sgd.rounds import Averager, AveragingResult

logger = logging.getLogger(__name__)

__all__ = ["OuterSync", "canonical_state"]


class TrainedParams(Protocol):
    """What the outer loop needs of the stage worker."""

    params: list[torch.Tensor]
    """The live parameters the inner optimizer steps (changed in place by the outer loop)."""

    def params_changed(self) -> None:
        """Called on the compute thread after the outer loop changed ``params`` in place."""


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
        self._rounds = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="outer-round")
        self._busy = threading.Event()
        self._shared_state = self.diloco.export_state()  # what groupmates download; refreshed on the compute thread
        self._state_lock = threading.Lock()
        self.history: collections.deque = collections.deque(maxlen=1000)
        """One dict per round (round, outcome, group, members, contributors, seconds, hash, pre_hash, error)."""
        self.closed = False
        averager.serve_state(self._state_for_peers)

    # -- called on the compute thread ---------------------------------------------------------
    def after_step(self) -> None:
        """The worker took an inner optimizer step: start a round when one is due."""
        if not self.diloco.record_inner_step():
            return
        if self._busy.is_set():  # the previous round is still running: this one is skipped
            self.diloco.rollback()
            return
        self._busy.set()
        delta = self.diloco.pseudo_gradient()
        snapshot = [p.detach().clone() for p in self.worker.params]
        pre_hash, weight, round_no = self.diloco.params_hash(), self.diloco.weight, self.diloco.round
        self._rounds.submit(self._run_round, delta, snapshot, pre_hash, weight, round_no)

    @torch.no_grad()
    def _apply(self, result: AveragingResult, snapshot: list[torch.Tensor], pre_hash: str, round_no: int) -> None:
        try:
            if not result.succeeded:
                self.diloco.rollback()
                self._record(round_no, "rolled back", result, pre_hash)
                return
            agreed = agree_on_state(result.gathered)
            if pre_hash != agreed.hash:
                # out of step with the group: adopt the group's global state (after its groupmates
                # applied this round) instead of applying an average to stale global params
                loaded = self._load_group_state(min_round=agreed.round + 1, donors=agreed.donors)
                if loaded is None:
                    self.diloco.rollback()
                    self._record(round_no, "out of step; state download failed", result, pre_hash)
                    return
                self.diloco.import_state(*loaded)
                self._record(self.diloco.round, "out of step; loaded group state", result, pre_hash)
                return
            drift = [p.detach() - s for p, s in zip(self.worker.params, snapshot)]
            self.diloco.apply(result.tensors)
            for p, d in zip(self.worker.params, drift):
                p.add_(d)
            self._record(self.diloco.round, "ok", result, pre_hash)
        finally:
            self.worker.params_changed()
            with self._state_lock:
                self._shared_state = self.diloco.export_state()
            self.averager.state_sharing_priority = float(self.diloco.round)
            self._busy.clear()

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
    def _run_round(self, delta, snapshot, pre_hash: str, weight: float, round_no: int) -> None:
        result = self.averager.average(delta, weight=weight, gather={"hash": pre_hash, "round": round_no})
        if self.closed:
            return
        self.submit_to_compute(self._apply, result, snapshot, pre_hash, round_no)

    def _state_for_peers(self):
        with self._state_lock:
            return self._shared_state

    def _record(self, round_no: int, outcome: str, result: AveragingResult, pre_hash: str) -> None:
        members = ",".join(sorted(peer[-6:] for peer in result.gathered)) or "-"
        entry = {"round": round_no, "outcome": outcome, "group": result.group_size, "members": members,
                 "contributors": result.contributors, "seconds": round(result.seconds, 2),
                 "hash": self.diloco.params_hash(), "pre_hash": pre_hash, "error": result.error}
        self.history.append(entry)
        # the format of this line is swarmrt.testing.asserts.OUTER_ROUND_OK's contract
        self.log(f"outer round {round_no} {outcome}: group {result.group_size}, contributors {result.contributors}, "
                 f"{result.seconds:.2f} s, hash {entry['hash']}, members {members}" + (f" ({result.error})" if result.error else "")
                 + "".join(f"; left out {peer[-6:]}: {why}" for peer, why in sorted(result.excluded.items())))

    # -- state for joiners and checkpoints (the worker saves it under the name it was attached with)
    def state_dict(self) -> dict:
        return self.diloco.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.diloco.load_state_dict(state)
        with self._state_lock:
            self._shared_state = self.diloco.export_state()
        self.averager.state_sharing_priority = float(self.diloco.round)

    def close(self) -> None:
        """Stop starting and applying rounds and shut the averager down (a running round is abandoned)."""
        self.closed = True
        self._rounds.shutdown(wait=False, cancel_futures=True)
        self.averager.shutdown()
