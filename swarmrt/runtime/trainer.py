"""The trainer: feeds data and drives every microbatch through a randomized route.

For each microbatch: forward hop by hop (stage 0 .. S-1), each hop on one peer
of that stage chosen by :func:`swarmrt.core.routing.choose_peer`; the loss and
its gradient are computed here; then backward hop by hop in reverse along the
same route. A hop that fails (timeout, refused, reset) is retried on another
peer of that stage; a peer that keeps failing is banned for a while.

Exactly-once: a forward failure only restarts the forward pass (forwards have
no side effects). A backward hop is retried with the stage input attached, so
any peer of the stage can recompute and apply it; each stage of each
microbatch must acknowledge exactly one backward. The trainer counts this
(``Accounting``) and the run fails loudly if a stage was applied twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
import uuid
from typing import Callable

import grpc
import torch

from swarmrt.core.config import RunConfig
from swarmrt.core.routing import BanList, PeerView, choose_peer
from swarmrt.data import Batches, loss_sum
from swarmrt.net import dht as dht_records
from swarmrt.net.client import StageClient
from swarmrt.net.proto import swarmrt_pb2 as pb
from swarmrt.net.tensors import from_proto, to_proto
from swarmrt.runtime.checkpoint import save_data_position

logger = logging.getLogger("swarmrt.trainer")


class NoPeers(RuntimeError):
    """A stage had no live peer for longer than ``network.no_peers_timeout_s``."""


class HopFailed(RuntimeError):
    """One hop failed on every peer it was tried on."""


@dataclasses.dataclass
class Accounting:
    """What happened to microbatches; ``duplicates`` must stay 0."""

    started: int = 0
    applied: int = 0
    forward_restarts: int = 0
    hop_retries: int = 0
    bans: int = 0
    duplicates: int = 0
    applied_stages: dict[str, set[int]] = dataclasses.field(default_factory=dict)

    def record_backward(self, microbatch: str, stage: int) -> None:
        stages = self.applied_stages.setdefault(microbatch, set())
        if stage in stages:
            self.duplicates += 1
        stages.add(stage)


@dataclasses.dataclass
class _Hop:
    stage: int
    peer: dht_records.StageRecord
    input: torch.Tensor


class Trainer:
    def __init__(self, config: RunConfig, dht, stream: int = 0, metrics_path: str | None = None,
                 progress: bool = False, clock: Callable[[], float] = time.monotonic, trainer_id: str | None = None):
        self.config = config
        self.dht = dht
        self.stream = stream
        self.metrics_path = metrics_path
        self.progress = progress
        self.clock = clock
        self.trainer_id = trainer_id or uuid.uuid4().hex[:8]
        self.rng = random.Random(config.run.seed * 1000 + stream)
        self.client = StageClient(config.network.max_tensor_mb)
        self.bans = BanList(after=config.network.ban_after_failures, ban_s=config.network.ban_s)
        self.peers: dict[int, list[dht_records.StageRecord]] = {s: [] for s in range(config.num_stages)}
        self.inflight: dict[str, int] = {}
        self.accounting = Accounting()
        self.batches = Batches(config.data, config.run.seed, stream)
        self.peers_changed = asyncio.Event()
        self.status = ""

    # -- discovery ---------------------------------------------------------------------------
    async def refresh_peers(self) -> None:
        for stage in range(self.config.num_stages):
            records = await asyncio.to_thread(dht_records.read_stage, self.dht, self.config.run.id, stage)
            self.peers[stage] = [r for r in records if r.state == "serving"]
        self.peers_changed.set()

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh_peers()
            except Exception as e:  # a failed DHT read keeps the last view
                logger.warning("peer refresh failed: %s", e)
            await asyncio.sleep(self.config.network.heartbeat_s / 2)

    def live_peers(self) -> list[int]:
        return [len(self.peers[s]) for s in range(self.config.num_stages)]

    async def _pick(self, stage: int, exclude: set[str]) -> dht_records.StageRecord:
        """A peer for ``stage``; waits (with a deadline) while the stage has no eligible peer."""
        deadline = self.clock() + self.config.network.no_peers_timeout_s
        while True:
            now = self.clock()
            candidates = [r for r in self.peers[stage] if r.peer_id not in exclude]
            views = [PeerView(r.peer_id, r.throughput or None, r.load + self.inflight.get(r.peer_id, 0))
                     for r in candidates]
            choice, reason = choose_peer(views, self.bans.banned(now), now, self.rng)
            if choice is not None:
                return next(r for r in candidates if r.peer_id == choice.peer_id)
            if exclude and not candidates and self.peers[stage]:
                exclude.clear()  # every live peer was tried once: allow them again
                continue
            if now > deadline:
                raise NoPeers(f"stage {stage} has no peers ({reason}) for {self.config.network.no_peers_timeout_s:g} s")
            self.status = f"stage {stage} has no peers ({reason}); waiting"
            self.peers_changed.clear()
            try:
                await asyncio.wait_for(self.peers_changed.wait(), timeout=min(1.0, deadline - now))
            except asyncio.TimeoutError:
                pass

    # -- hops --------------------------------------------------------------------------------
    async def _with_peer(self, peer: dht_records.StageRecord, coro_fn):
        self.inflight[peer.peer_id] = self.inflight.get(peer.peer_id, 0) + 1
        try:
            result = await coro_fn()
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise RuntimeError(f"stage {peer.stage} peer {peer.peer_id} refused the request: {e.details()}") from None
            if self.bans.failure(peer.peer_id, self.clock()):
                self.accounting.bans += 1
                logger.warning("banned stage %d peer %s for %g s after %s", peer.stage, peer.peer_id,
                               self.bans.ban_s, e.code())
            raise
        finally:
            self.inflight[peer.peer_id] -= 1
        self.bans.success(peer.peer_id)
        return result

    async def _forward_hop(self, stage: int, mb_id: str, x: torch.Tensor) -> tuple[dht_records.StageRecord, torch.Tensor]:
        net, tried = self.config.network, set()
        codec = "none" if not x.is_floating_point() else self.config.compression.activations
        request = pb.ForwardRequest(run_id=self.config.run.id, stage=stage, microbatch_id=mb_id,
                                    input=to_proto(x, codec), keep_context=True,
                                    output_codec=self.config.compression.activations)
        last_error = None
        for attempt in range(net.max_retries):
            peer = await self._pick(stage, tried)
            tried.add(peer.peer_id)
            try:
                response = await self._with_peer(peer, lambda: self.client.forward(peer.address, request,
                                                                                   net.forward_timeout_s))
                return peer, from_proto(response.output, f"stage {stage} output")
            except grpc.aio.AioRpcError as e:
                last_error = e
                self.accounting.hop_retries += 1
                logger.info("forward %s stage %d on %s failed (%s); retrying", mb_id, stage, peer.peer_id, e.code())
        raise HopFailed(f"forward of stage {stage} failed {net.max_retries} times: {last_error}")

    async def _backward_hop(self, hop: _Hop, mb_id: str, grad: torch.Tensor, samples: int) -> torch.Tensor | None:
        net, tried = self.config.network, set()
        need_grad_input = hop.stage > 0
        peer, attach_input = hop.peer, False
        deadline = self.clock() + net.no_peers_timeout_s
        while True:
            request = pb.BackwardRequest(run_id=self.config.run.id, stage=hop.stage, microbatch_id=mb_id,
                                         grad_output=to_proto(grad, self.config.compression.gradients),
                                         samples=samples, grad_codec=self.config.compression.gradients,
                                         need_grad_input=need_grad_input)
            if attach_input:
                codec = "none" if not hop.input.is_floating_point() else self.config.compression.activations
                request.input.CopyFrom(to_proto(hop.input, codec))
            try:
                response = await self._with_peer(peer, lambda: self.client.backward(peer.address, request,
                                                                                    net.backward_timeout_s))
                self.accounting.record_backward(mb_id, hop.stage)
                if not need_grad_input:
                    return None
                return from_proto(response.grad_input, f"stage {hop.stage} grad_input")
            except grpc.aio.AioRpcError as e:
                self.accounting.hop_retries += 1
                tried.add(peer.peer_id)
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION and not attach_input:
                    attach_input = True  # context evicted: same peer recomputes from the input
                    continue
                if self.clock() > deadline:
                    raise HopFailed(f"backward of stage {hop.stage} for {mb_id} kept failing: {e.code()} {e.details()}")
                logger.info("backward %s stage %d on %s failed (%s); retrying elsewhere", mb_id, hop.stage,
                            peer.peer_id, e.code())
                attach_input = True
                peer = await self._pick(hop.stage, tried)

    # -- one microbatch ----------------------------------------------------------------------
    async def run_microbatch(self, step: int, index: int, x: torch.Tensor, y: torch.Tensor) -> float:
        self.accounting.started += 1
        for attempt in range(self.config.network.max_retries):
            mb_id = f"{self.trainer_id}:{step}:{index}:{attempt}"
            hops: list[_Hop] = []
            try:
                h = x
                for stage in range(self.config.num_stages):
                    peer, out = await self._forward_hop(stage, mb_id, h)
                    hops.append(_Hop(stage, peer, h))
                    h = out
            except HopFailed as e:
                self.accounting.forward_restarts += 1
                logger.warning("microbatch %s: %s; restarting its forward pass", mb_id, e)
                continue
            output = h.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = loss_sum(self.config.data, output, y)
                (grad,) = torch.autograd.grad(loss, output)
            for hop in reversed(hops):
                grad = await self._backward_hop(hop, mb_id, grad, samples=x.shape[0])
            self.accounting.applied += 1
            return float(loss)
        raise HopFailed(f"microbatch {step}:{index} could not complete a forward pass in "
                        f"{self.config.network.max_retries} attempts")

    async def train_step(self, step: int) -> float:
        x, y = self.batches.batch(step)
        m = self.config.data.microbatch_size
        losses = await asyncio.gather(*[self.run_microbatch(step, i, x[i * m:(i + 1) * m], y[i * m:(i + 1) * m])
                                        for i in range(self.config.data.microbatches_per_step)])
        return sum(losses) / x.shape[0]

    # -- the loop ----------------------------------------------------------------------------
    async def run(self, steps: int, start_step: int = 0, stop: asyncio.Event | None = None) -> dict:
        """Train steps ``start_step .. steps-1``. When ``stop`` is set (SIGTERM), the step in
        flight finishes and the loop ends there; with ``[checkpoint] location`` the data
        position (next step) is written after every step, for ``swarmrt train --resume``."""
        refresher = asyncio.create_task(self._refresh_loop())
        position_root = self.config.checkpoint.location
        metrics = open(self.metrics_path, "a", buffering=1) if self.metrics_path else None
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        started, samples, losses, done = time.time(), 0, [], start_step
        try:
            for step in range(start_step, steps):
                if stop is not None and stop.is_set():
                    break
                loss = await self.train_step(step)
                done = step + 1
                if position_root is not None:
                    await asyncio.to_thread(save_data_position, position_root, self.config.run.id, self.stream, done)
                samples += self.config.data.batch_size
                losses.append(loss)
                elapsed = max(time.time() - started, 1e-9)
                record = {"step": step, "loss": loss, "samples": samples, "time": time.time(),
                          "samples_per_s": samples / elapsed, "peers": self.live_peers(),
                          "hop_retries": self.accounting.hop_retries, "applied": self.accounting.applied,
                          "bans": self.accounting.bans}
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.set_postfix_str(f"loss {loss:.3f} | {samples / elapsed:.1f} samples/s | peers "
                                        f"{'/'.join(map(str, self.live_peers()))}")
                    bar.update(1)
        finally:
            refresher.cancel()
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
            await self.client.close()
        acc = self.accounting
        if acc.duplicates:
            raise RuntimeError(f"{acc.duplicates} stage backwards were applied twice")
        incomplete = [mb for mb, st in acc.applied_stages.items() if len(st) != self.config.num_stages]
        return {"steps": done - start_step, "start_step": start_step, "next_step": done,
                "stopped_early": done < steps, "samples": samples, "first_loss": losses[0] if losses else None,
                "final_loss": losses[-1] if losses else None, "seconds": time.time() - started,
                "microbatches": acc.started, "applied": acc.applied, "duplicates": acc.duplicates,
                "partially_applied": len(incomplete), "hop_retries": acc.hop_retries, "bans": acc.bans,
                "forward_restarts": acc.forward_restarts, "peers": self.live_peers()}
