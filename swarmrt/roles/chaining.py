"""The trainer's side of peer-to-peer hops (``[network] chain_hops``; the peers' side and the wire
contract are in :mod:`swarmrt.pipeline.chain`).

Forward: the trainer calls the route's first peer with the rest of the route; the reply carries the
last hop's output and the hops that served (``done``, checked to be a prefix of the route the trainer
asked for). A broken chain comes back with the output of the last hop that served, which is the input
of the hop that failed: the trainer re-plans from there exactly as when it relays (another peer of that
stage, or a skip), and chains again from that hop.

Backward: the trainer calls the last hop's peer with the earlier hops in reverse. The reply lists the
hops that applied. When the chain broke, or the call failed so that nothing is known, the trainer falls
back to relaying (:meth:`Chaining.backward`):

- the gradient to go on from is the one the reply carried for the broken hop, else the trainer's own
  loss gradient at the top of the route;
- the inputs the relay needs (a retried hop recomputes from its input) are recomputed by forwards that
  keep no context, from the nearest hop whose input the trainer holds;
- a hop whose peer already applied is asked *again* on the same peer only: a peer never applies a
  microbatch twice, so it just returns its input gradient; if that peer is gone, the hops below stay
  unapplied (counted as partially applied), never applied twice;
- the other hops are retried as relayed hops are: the same peer first, then other peers of the stage.

What chaining gives up, by design: the trainer no longer times each peer (routing uses what it measured
before, or treats peers as new), cannot run checked work (``verify_fraction`` must be 0), and a bad
output is blamed on the peer the chain's reply says produced it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import grpc
import torch

from swarmrt.data import loss_sum
from swarmrt.discovery.records import StageRecord
from swarmrt.pipeline.chain import HEAD
from swarmrt.routing.verify import BadReply
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.tensors import Framed

logger = logging.getLogger("swarmrt.trainer")


@dataclasses.dataclass
class Hop:
    """One hop a microbatch's forward went through: the stage, the peer that served it, what it was given."""

    stage: int
    peer: StageRecord
    input: torch.Tensor | None
    """What the hop was given (None: a chained hop's, which the trainer never saw; recomputed if needed)."""
    head: bool = False
    """Stage 0's head pass of a model with tied ends (its own microbatch key, its input's gradient wanted)."""

    @property
    def need_grad_input(self) -> bool:
        """Whether its backward must return its input's gradient (every hop's but stage 0's token ids)."""
        return self.stage > 0 or self.head


@dataclasses.dataclass(frozen=True)
class PeerLoss:
    """The loss (summed over the microbatch's samples) that a chained route's last hop computed."""

    value: float


class PeerGone(RuntimeError):
    """A peer a route names is no longer in the trainer's view of the swarm."""


def _key(mb_id: str, head: bool) -> str:
    return mb_id + HEAD if head else mb_id


class Chaining:
    def __init__(self, trainer):
        """``trainer``: the :class:`~swarmrt.roles.trainer.Trainer` it chains for (its client, view of the
        swarm, checks, bans and accounting, and its relayed backward hop)."""
        self.trainer = trainer
        self.config = trainer.config
        self.enabled = trainer.config.network.chain_hops

    def _record(self, peer_id: str, stage: int):
        record = self.trainer.records.get(peer_id)
        if record is None or record.stage != stage:
            raise PeerGone(f"peer {peer_id} no longer serves stage {stage}")
        return record

    # -- forward -------------------------------------------------------------------------------
    async def forward(self, route, position: int, mb_id: str, x: torch.Tensor, keep_context: bool,
                      head_peer: str | None, target: torch.Tensor
                      ) -> tuple[list[Hop], "torch.Tensor | PeerLoss", pb.ChainBreak | None]:
        """Forward ``x`` along ``route`` from ``position`` to its end (then a tied head on ``head_peer``),
        peer to peer; the last hop computes the loss against ``target``. Returns the hops served (only the
        first one's input is known here), the loss (:class:`PeerLoss`) or, when the chain broke, the output
        of the last hop served, and where it broke (None: it did not). Raises what a relayed hop raises
        when the first peer fails (its gRPC error, :class:`PeerGone`, :class:`BadReply`)."""
        t, net = self.trainer, self.config.network
        wanted = [(s, p, False) for s, p in route.hops[position:]]
        if head_peer is not None:
            wanted.append((0, head_peer, True))
        records = [self._record(p, s) for s, p, _ in wanted]
        first = records[0]
        request = t._forward_request(wanted[0][0], _key(mb_id, wanted[0][2]), x, keep_context)
        request.message.next.extend(pb.ChainHop(stage=s, peer_id=p, head=h, need_grad_input=True)
                                    for s, p, h in wanted[1:])
        request.attach("target", target)
        response = await t._with_peer(first, lambda: t.client.forward(first.address, request,
                                                                      net.forward_timeout_s * len(wanted)))
        done = [(d.stage, d.peer_id) for d in response.done]
        broken = response.broken if response.HasField("broken") else None
        served = len(done)
        fits = 1 <= served <= len(wanted) and all(d == w[:2] for d, w in zip(done, wanted))
        if fits and broken is None:
            fits = served == len(wanted) and response.has_loss
        elif fits:
            fits = served < len(wanted) and (broken.stage, broken.peer_id) == wanted[served][:2]
        if not fits:
            t.checks.ban(first, f"its chained forward reply names hops {done} (broken: "
                                f"{broken.peer_id if broken else None}), not the route it was given")
            raise BadReply(f"stage {first.stage} peer {first.peer_id}: chained reply does not match the route")
        stage, _, head = wanted[served - 1]
        producer = records[served - 1]
        try:
            if broken is None:
                if not math.isfinite(response.loss):
                    raise BadReply(f"stage {stage} {'head ' if head else ''}loss (chained): {response.loss}")
                out = PeerLoss(response.loss)
            else:
                out = t.checks.decode(response, "output", f"stage {stage} {'head ' if head else ''}output (chained)",
                                      *t.checks.output_spec(stage, x, head))
        except BadReply as e:
            t.checks.ban(producer, str(e))
            raise
        hops = [Hop(s, r, x if i == 0 else None, head=h) for i, ((s, _, h), r) in enumerate(zip(wanted, records))]
        t.accounting.chained_hops += served - 1
        return hops[:served], out, broken

    # -- backward ------------------------------------------------------------------------------
    async def backward(self, hops: list[Hop], mb_id: str, grad: torch.Tensor | None, samples: int,
                       target: torch.Tensor) -> None:
        """Backward along ``hops`` (forward order) from the loss gradient ``grad`` (None: the one the last
        hop kept when it computed the loss), peer to peer; then the relayed fallback for whatever the chain
        did not apply (see the module docstring)."""
        t, net = self.trainer, self.config.network
        chain = list(reversed(hops))
        top = chain[0]
        timeout = net.backward_timeout_s * len(chain)
        request = Framed(pb.BackwardRequest(
            run_id=self.config.run.id, stage=top.stage, microbatch_id=_key(mb_id, top.head), samples=samples,
            grad_codec=self.config.compression.gradients, need_grad_input=top.need_grad_input,
            deadline_unix=time.time() + timeout, from_loss=grad is None,
            next=[pb.ChainHop(stage=h.stage, peer_id=h.peer.peer_id, head=h.head, need_grad_input=h.need_grad_input)
                  for h in chain[1:]]))
        if grad is not None:
            request.attach("grad_output", grad, self.config.compression.gradients)
        applied: set[int] = set()  # indices into ``chain``
        resume: tuple[int, torch.Tensor] | None = None
        try:
            response = await t._with_peer(top.peer, lambda: t.client.backward(top.peer.address, request, timeout))
            applied, resume = self._read_backward(response, chain, hops[0].input)
        except (grpc.aio.AioRpcError, BadReply) as e:  # nothing known: every hop is redone or asked again
            what = e.code() if isinstance(e, grpc.aio.AioRpcError) else e
            t.accounting.hop_retries += 1
            logger.info("microbatch %s: chained backward from stage %d on %s failed (%s); relaying it",
                        mb_id, top.stage, top.peer.peer_id, what)
        for i in applied:
            if not chain[i].head:
                t.accounting.record_backward(mb_id, chain[i].stage)
        if len(applied) == len(chain):
            return
        start, g = resume if resume is not None else (0, grad)
        await self._recompute_inputs(hops, len(hops) - 1 - start, mb_id)
        if g is None:  # the loss's gradient stayed on the last peer: recompute it here
            g = await self._loss_gradient(hops[-1], mb_id, target)
        for i in range(start, len(chain)):
            if all(j in applied for j in range(i, len(chain))):
                return  # everything below applied already
            try:
                g = await t._backward_hop(chain[i], mb_id, g, samples, again=i in applied)
            except RuntimeError as e:  # a grad_input that overflows this stage: its sender lied
                if i == 0 or "parameter gradients are not finite" not in str(e):
                    raise
                t.checks.ban(chain[i - 1].peer, f"its grad_input was refused by stage {chain[i].stage}: {e}")
                return  # dropped from here on (partially applied)

    def _read_backward(self, response: Framed, chain: list[Hop], x: torch.Tensor
                       ) -> tuple[set[int], tuple[int, torch.Tensor] | None]:
        """The hops (indices into ``chain``) a chained backward's reply says applied, in chain order, and
        where to go on from (the broken hop and the gradient it was to be given); :class:`BadReply` when
        the reply names hops outside the chain."""
        t, applied, position = self.trainer, set(), 0
        for done in response.done:
            while position < len(chain) and (chain[position].stage, chain[position].peer.peer_id) != \
                    (done.stage, done.peer_id):
                position += 1
            if position == len(chain):
                raise BadReply(f"chained backward reply names stage {done.stage} peer {done.peer_id}, "
                               "not a hop of its chain (or out of order)")
            applied.add(position)
            position += 1
        if not response.HasField("broken"):
            if len(applied) != len(chain):
                raise BadReply(f"chained backward reply: {len(applied)} of {len(chain)} hops applied, no break named")
            return applied, None
        broken = response.broken
        index = next((i for i, h in enumerate(chain) if i not in applied and
                      (h.stage, h.peer.peer_id) == (broken.stage, broken.peer_id)), None)
        if index is None or index == 0 and not response.HasField("grad_input"):
            return applied, None  # go on from the top with the trainer's own gradient
        hop = chain[index]
        shape, dtype = t.checks.output_spec(hop.stage, x, hop.head)
        logger.info("chained backward broke at stage %d on %s (%s: %s); relaying from there", hop.stage,
                    broken.peer_id, broken.code, broken.details)
        return applied, (index, t.checks.decode(response, "grad_input", f"gradient for stage {hop.stage}", shape,
                                                dtype))

    async def _loss_gradient(self, last: Hop, mb_id: str, target: torch.Tensor) -> torch.Tensor:
        """The loss's gradient at ``last``'s output: its forward again (no context kept), the loss here."""
        output = (await self._forward_again(last, mb_id)).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_sum(self.config.data, output, target), output)
        return grad

    async def _forward_again(self, hop: Hop, mb_id: str) -> torch.Tensor:
        """``hop``'s output for its (known) input, keeping no context: on its own peer first, else another
        peer of its stage."""
        t, net = self.trainer, self.config.network
        peer, tried = hop.peer, set()
        for _ in range(net.max_retries):
            request = t._forward_request(hop.stage, _key(mb_id, hop.head), hop.input, False)
            try:
                response = await t._with_peer(peer, lambda: t.client.forward(peer.address, request,
                                                                             net.forward_timeout_s))
                return t.checks.decode(response, "output", f"stage {hop.stage} output (recomputed)",
                                       *t.checks.output_spec(hop.stage, hop.input, hop.head))
            except (grpc.aio.AioRpcError, BadReply):
                tried.add(peer.peer_id)
                peer = await t._peer_for(hop.stage, tried)
        raise RuntimeError(f"microbatch {mb_id}: could not recompute the output of stage {hop.stage}")

    async def _recompute_inputs(self, hops: list[Hop], upto: int, mb_id: str) -> None:
        """Give ``hops[1..upto]`` their inputs where the trainer never saw them (chained forwards): forwards
        that keep no context, on the hop's own peer first, else another peer of its stage."""
        for i in range(1, upto + 1):
            if hops[i].input is None:
                hops[i].input = await self._forward_again(hops[i - 1], mb_id)
