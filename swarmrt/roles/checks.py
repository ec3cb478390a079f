"""The trainer's side of "trust nothing a peer says": checked replies, checked work, measured speed.

:class:`ReplyChecks` is what :class:`~swarmrt.roles.trainer.Trainer` calls at
each hop (the decisions are the pure :mod:`swarmrt.routing.verify`):

- :meth:`ReplyChecks.decode` decodes a reply tensor only after its declared
  dtype and shape are the ones expected (so a 40-byte message cannot make the
  trainer allocate a gigabyte), then checks the values are finite. The
  expected forward output of each stage is learnt once from the model itself
  (built on the meta device: shapes only); a backward's ``grad_input`` must be
  shaped like the input the trainer sent that stage.
- a bad reply bans the peer that sent it at once, for
  ``network.bad_reply_ban_s`` (:meth:`ReplyChecks.ban`), and the hop is
  retried elsewhere by the caller; the next stage never sees the garbage, so
  it is never blamed for it.
- :meth:`ReplyChecks.verify` re-runs a ``network.verify_fraction`` of forward
  hops on another peer of the stage and bans the liar (rules:
  :func:`swarmrt.routing.verify.judge`).
- :meth:`ReplyChecks.measured` hands routing the throughput this trainer
  measured for each peer instead of the figure the peer announced.

The counts (:meth:`ReplyChecks.summary`) go into the trainer's summary.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

import grpc
import torch

from swarmrt.config import RunConfig
from swarmrt.discovery.records import StageRecord
from swarmrt.routing.verify import BadReply, OutputScale, ThroughputMeter, check_reply, judge, rms, should_check
from swarmrt.wire.tensors import BadTensor, Framed

logger = logging.getLogger("swarmrt.trainer")


@dataclasses.dataclass
class CheckCounts:
    bad_replies: int = 0
    """Replies refused (wrong dtype/shape, NaN, undecodable); each banned its sender."""
    checked_hops: int = 0
    """Forward hops re-run on a second peer and compared."""
    check_mismatches: int = 0
    """Checked hops whose outputs disagreed beyond ``network.verify_tolerance``."""
    check_bans: int = 0
    """Peers banned because checked work found them lying."""
    check_unresolved: int = 0
    """Mismatches where nobody could be shown to have lied (two peers, no output history)."""


class ReplyChecks:
    def __init__(self, config: RunConfig, trainer):
        """``trainer``: the :class:`~swarmrt.roles.trainer.Trainer` it checks for (its client, view of
        the swarm, bans, accounting, clock and random generator)."""
        self.config = config
        self.trainer = trainer
        from swarmrt.models.build import output_specs  # torch model code: only when a trainer starts

        self.specs, self.head_spec = output_specs(config)
        self.batch_dims = 2 if config.data.kind == "text" else 1
        self.meter = ThroughputMeter()
        self.scale = OutputScale()
        self.counts = CheckCounts()
        self.max_bytes = config.network.max_tensor_mb << 20

    # -- replies ---------------------------------------------------------------------------
    def output_spec(self, stage: int, x: torch.Tensor, head: bool = False) -> tuple[tuple[int, ...], torch.dtype]:
        """The shape and dtype stage ``stage``'s output (``head``: the tied head's, on stage 0) must
        have for input ``x``."""
        dtype, trailing = self.head_spec if head else self.specs[stage]
        return tuple(x.shape[:self.batch_dims]) + trailing, dtype

    def decode(self, response: Framed, field: str, what: str, shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``field`` of a reply, checked: declared dtype and shape first (nothing is allocated
        for a message that declares another), then decoded within ``network.max_tensor_mb``, then
        finite. :class:`~swarmrt.routing.verify.BadReply` names what was wrong."""
        msg = getattr(response, field)
        want = str(dtype).removeprefix("torch.")
        if msg.dtype != want or tuple(msg.shape) != tuple(shape):
            raise BadReply(f"{what}: declares {msg.dtype or 'no dtype'}{list(msg.shape)}, expected {want}{list(shape)}")
        try:
            tensor = response.tensor(field, what, self.max_bytes)
        except BadTensor as e:
            raise BadReply(str(e)) from None
        return check_reply(tensor, what, shape, dtype)

    def ban(self, peer: StageRecord, reason: str, *, by_check: bool = False) -> None:
        """Ban ``peer`` at once for what it sent (once: microbatches in flight may catch it together)."""
        trainer = self.trainer
        if peer.peer_id in trainer.bans.banned(trainer.clock()):
            return
        trainer.bans.ban(peer.peer_id, trainer.clock(), self.config.network.bad_reply_ban_s, reason)
        trainer.accounting.bans += 1
        if by_check:
            self.counts.check_bans += 1
        else:
            self.counts.bad_replies += 1
        logger.warning("banned stage %d peer %s for %g s: %s", peer.stage, peer.peer_id,
                       self.config.network.bad_reply_ban_s, reason)

    # -- measured throughput ---------------------------------------------------------------
    def observe_forward(self, peer_id: str, samples: int, seconds: float) -> None:
        self.meter.observe_forward(peer_id, samples, seconds)

    def measured(self, records: Iterable[StageRecord]) -> list[StageRecord]:
        """``records`` with each peer's throughput replaced by this trainer's own figure (0: not yet
        measured, which routing treats as a newcomer)."""
        return [dataclasses.replace(r, throughput=self.meter.get(r.peer_id) or 0.0) for r in records]

    # -- checked work ----------------------------------------------------------------------
    async def verify(self, stage: int, peer: StageRecord, mb_id: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Maybe (``network.verify_fraction``) re-run the forward of ``stage`` on other peers and judge.
        Liars are banned; :class:`BadReply` when ``peer`` itself lied (the caller retries the hop)."""
        trainer, net = self.trainer, self.config.network
        if not should_check(net.verify_fraction, trainer.rng):
            return
        outputs = {peer.peer_id: out}
        verdict = await self._second_opinion(stage, mb_id, x, outputs)
        if verdict is None:
            return
        self.counts.checked_hops += 1
        if verdict.agreed:
            self.scale.update(stage, rms(out))
            return
        self.counts.check_mismatches += 1
        logger.warning("checked work, microbatch %s stage %d: %s", mb_id, stage, verdict.reason)
        if not verdict.liars:
            self.counts.check_unresolved += 1
        for liar in verdict.liars:
            self.ban(peer if liar == peer.peer_id else trainer.records[liar], f"checked work: {verdict.reason}",
                     by_check=True)
        honest = [p for p in outputs if p not in verdict.liars]
        if verdict.liars and honest:
            self.scale.update(stage, rms(outputs[honest[0]]))
        if peer.peer_id in verdict.liars:
            raise BadReply(f"stage {stage} output of {peer.peer_id} failed checked work: {verdict.reason}")

    async def _second_opinion(self, stage: int, mb_id: str, x: torch.Tensor, outputs: dict[str, torch.Tensor]):
        """Run the hop on one more peer (two more if the first two disagree and the stage has a third);
        None when no other peer could compute it."""
        trainer, net = self.trainer, self.config.network
        banned = trainer.bans.banned(trainer.clock())
        others = sorted(r.peer_id for r in trainer.peers[stage] if r.peer_id not in outputs and r.peer_id not in banned)
        trainer.rng.shuffle(others)
        shape, dtype = self.output_spec(stage, x)
        verdict = None
        for other in others:
            record = trainer.records.get(other)
            if record is None:
                continue
            request = trainer._forward_request(stage, f"{mb_id}:check", x, keep_context=False)
            try:
                response = await trainer.client.forward(record.address, request, net.forward_timeout_s)
                outputs[other] = self.decode(response, "output", f"stage {stage} output (check)", shape, dtype)
            except BadReply as e:
                self.ban(record, str(e))
                continue
            except grpc.aio.AioRpcError:
                continue  # a check that could not run is no evidence either way
            verdict = judge(outputs, net.verify_tolerance, self.scale.get(stage))
            if verdict.agreed or verdict.liars or len(outputs) >= 3:
                return verdict
        if verdict is None:
            logger.debug("checked work, microbatch %s stage %d: no other peer to compare with", mb_id, stage)
        return verdict

    def summary(self) -> dict:
        return dataclasses.asdict(self.counts)

