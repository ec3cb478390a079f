"""The trainer: feeds data and drives every microbatch through a randomized route.

For each microbatch: forward hop by hop (stage 0 .. S-1), each hop on one peer
of that stage chosen by :func:`swarmrt.routing.wiring.choose_peer`; the loss and
its gradient are computed here; then backward hop by hop in reverse along the
same route. A hop that fails (timeout, refused, reset) is retried on another
peer of that stage; a peer that keeps failing is banned for a while.

Stage skipping (``routing.skip_ratio > 0``): the path scheduler
(:mod:`swarmrt.routing.live`) gives each microbatch a route, which
stages and which peer at each, never skipping the first or the last stage.
The forward visits only the route's hops; a hop that fails is re-planned
(same stages on other peers when they have live ones, else other stages);
backward retraces the route in reverse. With ``skip_ratio == 0`` none of this
runs: the full pipeline above, unchanged.

Exactly-once: a forward failure only restarts the forward pass (forwards have
no side effects). A backward hop is retried with the stage input attached, so
any peer of the stage can recompute and apply it; each stage that a
microbatch's route visited must acknowledge exactly one backward. The trainer
counts this (``Accounting``) and the run fails loudly if a stage was applied
twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import math
import random
import time
import uuid
from typing import Callable

import grpc
import torch

from swarmrt.config import RunConfig
from swarmrt.routing.paths import Route
from swarmrt.routing.wiring import BanList, PeerView, choose_peer
from swarmrt.data import Batches, loss_sum
from swarmrt.discovery import dht as dht_records
from swarmrt.wire.client import StageClient
from swarmrt.wire.proto import swarmrt_pb2 as pb
from swarmrt.wire.tensors import from_proto, to_proto
from swarmrt.checkpoint.store import save_data_position
from swarmrt.routing.live import SkipRouting

logger = logging.getLogger("swarmrt.trainer")


class NoPeers(RuntimeError):
    """A stage had no live peer for longer than ``network.no_peers_timeout_s``."""


class HopFailed(RuntimeError):
    """One hop failed on every peer it was tried on."""


class _PeerGone(RuntimeError):
    """The peer a route names is no longer in the trainer's view of the swarm."""


@dataclasses.dataclass
class Accounting:
    """What happened to microbatches; ``duplicates`` must stay 0."""

    started: int = 0
    applied: int = 0
    forward_restarts: int = 0
    hop_retries: int = 0
    bans: int = 0
    replans: int = 0
    duplicates: int = 0
    applied_stages: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    expected_stages: dict[str, frozenset[int]] = dataclasses.field(default_factory=dict)
    """Stages each microbatch's backward must reach: all S, or the stages of its route."""

    def expect(self, microbatch: str, stages) -> None:
        """``microbatch`` finished its forward through ``stages``; each now owes one backward."""
        self.expected_stages[microbatch] = frozenset(stages)

    def record_backward(self, microbatch: str, stage: int) -> None:
        stages = self.applied_stages.setdefault(microbatch, set())
        if stage in stages:
            self.duplicates += 1
        stages.add(stage)

    def incomplete(self) -> list[str]:
        """Microbatches whose backward reached other stages than their forward went through."""
        return [mb for mb in self.expected_stages.keys() | self.applied_stages.keys()
                if self.applied_stages.get(mb, set()) != self.expected_stages.get(mb)]

    def per_stage(self, num_stages: int) -> list[int]:
        """Microbatches whose backward each stage acknowledged."""
        counts = [0] * num_stages
        for stages in self.applied_stages.values():
            for s in stages:
                counts[s] += 1
        return counts

    def stages_visited(self) -> dict[str, int]:
        """How many microbatches visited how many stages (JSON-friendly keys)."""
        hist: dict[str, int] = {}
        for stages in self.expected_stages.values():
            hist[str(len(stages))] = hist.get(str(len(stages)), 0) + 1
        return dict(sorted(hist.items()))


@dataclasses.dataclass
class _Hop:
    stage: int
    peer: dht_records.StageRecord
    input: torch.Tensor


def parse_stage_subset(text: str | None, num_stages: int) -> tuple[tuple[int, ...] | None, str]:
    """Stages to evaluate with, from ``"0,2,5"`` (None or empty: all of them), and why they are (not) usable.

    The first and the last stage are needed (they hold the input and the loss);
    stages must be distinct and in increasing order.
    """
    if not text:
        return tuple(range(num_stages)), "all stages"
    try:
        stages = tuple(int(part) for part in text.split(","))
    except ValueError:
        return None, f"{text!r} is not a comma-separated list of stage numbers"
    last = num_stages - 1
    if any(not 0 <= s <= last for s in stages):
        return None, f"{text!r} names a stage outside 0..{last}"
    if any(a >= b for a, b in zip(stages, stages[1:])):
        return None, f"{text!r} must list distinct stages in increasing order"
    if stages[0] != 0 or stages[-1] != last:
        return None, f"{text!r} must start with stage 0 and end with stage {last} (never skipped)"
    skipped = sorted(set(range(num_stages)) - set(stages))
    return stages, f"skips stages {', '.join(map(str, skipped))}" if skipped else "all stages"


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
        self.records: dict[str, dht_records.StageRecord] = {}
        """Every serving peer of the last refresh, by peer id."""
        self.routing: SkipRouting | None = None
        if config.routing.skip_ratio > 0:
            from swarmrt.models.build import check_skip

            check_skip(config)
            self.routing = SkipRouting(config)
        self._route_ids = itertools.count()
        self.inflight: dict[str, int] = {}
        self.accounting = Accounting()
        self.batches = Batches(config.data, config.run.seed, stream)
        self.peers_changed = asyncio.Event()
        self.status = ""

    # -- discovery ---------------------------------------------------------------------------
    async def refresh_peers(self) -> None:
        records = []
        for stage in range(self.config.num_stages):
            records += await asyncio.to_thread(dht_records.read_stage, self.dht, self.config.run.id, stage)
        self.view_peers(records)

    def view_peers(self, records: list[dht_records.StageRecord]) -> None:
        """Take a new view of the swarm: the stage records of every peer (as read from the DHT)."""
        for stage in range(self.config.num_stages):
            self.peers[stage] = [r for r in records if r.stage == stage and r.state == "serving"]
        self.records = {r.peer_id: r for stage in self.peers.values() for r in stage}
        if self.routing is not None:
            self.routing.sync(self.records.values(), self.bans.banned(self.clock()))
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

    def _forward_request(self, stage: int, mb_id: str, x: torch.Tensor, keep_context: bool) -> pb.ForwardRequest:
        codec = "none" if not x.is_floating_point() else self.config.compression.activations
        return pb.ForwardRequest(run_id=self.config.run.id, stage=stage, microbatch_id=mb_id,
                                 input=to_proto(x, codec), keep_context=keep_context,
                                 output_codec=self.config.compression.activations)

    async def _forward_hop(self, stage: int, mb_id: str, x: torch.Tensor,
                           keep_context: bool = True) -> tuple[dht_records.StageRecord, torch.Tensor]:
        net, tried = self.config.network, set()
        request = self._forward_request(stage, mb_id, x, keep_context)
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
        if self.routing is not None:
            return await self._run_routed_microbatch(step, index, x, y)
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
            self.accounting.expect(mb_id, range(self.config.num_stages))
            for hop in reversed(hops):
                grad = await self._backward_hop(hop, mb_id, grad, samples=x.shape[0])
            self.accounting.applied += 1
            return float(loss)
        raise HopFailed(f"microbatch {step}:{index} could not complete a forward pass in "
                        f"{self.config.network.max_retries} attempts")

    # -- one microbatch along a scheduled route (stage skipping) -----------------------------
    def _sync_routing(self, now: float) -> None:
        """Bring the scheduler's peer table up to the latest refresh and bans."""
        self.routing.sync(self.records.values(), self.bans.banned(now))

    async def _route(self, microbatch: int) -> Route:
        """A route for a new microbatch; waits (with a deadline) while none is legal."""
        timeout = self.config.network.no_peers_timeout_s
        deadline = self.clock() + timeout
        while True:
            now = self.clock()
            self._sync_routing(now)
            route, why = self.routing.route(now, self.rng, microbatch)
            if route is not None:
                logger.debug("route %d: %s", microbatch, why)
                return route
            if now > deadline:
                raise NoPeers(f"no route for a microbatch for {timeout:g} s: {why}")
            self.status = f"no route ({why}); waiting"
            self.peers_changed.clear()
            try:
                await asyncio.wait_for(self.peers_changed.wait(), timeout=min(1.0, deadline - now))
            except asyncio.TimeoutError:
                pass

    async def _forward_on(self, peer_id: str, stage: int, mb_id: str,
                          x: torch.Tensor) -> tuple[dht_records.StageRecord, torch.Tensor]:
        """One forward RPC on the peer a route names (no retry: the caller re-plans)."""
        peer = self.records.get(peer_id)
        if peer is None or peer.stage != stage:
            raise _PeerGone(f"peer {peer_id} no longer serves stage {stage}")
        request = self._forward_request(stage, mb_id, x, keep_context=True)
        started = self.clock()
        response = await self._with_peer(peer, lambda: self.client.forward(peer.address, request,
                                                                           self.config.network.forward_timeout_s))
        self.routing.observe_hop(peer_id, self.clock() - started)
        return peer, from_proto(response.output, f"stage {stage} output")

    async def _run_routed_microbatch(self, step: int, index: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward along the scheduler's route (re-planned around failed hops), backward in reverse."""
        net = self.config.network
        self.accounting.started += 1
        for attempt in range(net.max_retries):
            mb_id = f"{self.trainer_id}:{step}:{index}:{attempt}"
            route = await self._route(next(self._route_ids))
            hops: list[_Hop] = []
            failed: set[str] = set()
            h, position = x, 0
            try:
                while position < len(route.hops):
                    stage, peer_id = route.hops[position]
                    try:
                        peer, out = await self._forward_on(peer_id, stage, mb_id, h)
                    except (grpc.aio.AioRpcError, _PeerGone) as e:
                        what = e.code() if isinstance(e, grpc.aio.AioRpcError) else e
                        self.accounting.hop_retries += 1
                        failed.add(peer_id)
                        if len(failed) >= net.max_retries:
                            raise HopFailed(f"{len(failed)} peers failed its forward (last: stage {stage} on "
                                            f"{peer_id}: {what})") from None
                        now = self.clock()
                        self._sync_routing(now)
                        new, why = (self.routing.replan(route, position, failed, now, self.rng) if position > 0
                                    else (None, "its first hop failed"))
                        if new is None:
                            raise HopFailed(f"forward of stage {stage} on {peer_id} failed ({what}); {why}") from None
                        self.accounting.replans += 1
                        logger.info("microbatch %s: forward of stage %d on %s failed (%s); %s", mb_id, stage,
                                    peer_id, what, why)
                        route = new
                        continue
                    hops.append(_Hop(stage, peer, h))
                    h, position = out, position + 1
            except HopFailed as e:
                self.routing.aborted(route)
                self.accounting.forward_restarts += 1
                logger.warning("microbatch %s: %s; restarting it on a new route", mb_id, e)
                continue
            output = h.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = loss_sum(self.config.data, output, y)
                (grad,) = torch.autograd.grad(loss, output)
            self.accounting.expect(mb_id, route.stages)
            for hop in reversed(hops):
                grad = await self._backward_hop(hop, mb_id, grad, samples=x.shape[0])
            self.routing.finished(route)
            self.accounting.applied += 1
            return float(loss.detach())
        raise HopFailed(f"microbatch {step}:{index} could not complete a forward pass in {net.max_retries} attempts")

    async def train_step(self, step: int) -> float:
        x, y = self.batches.batch(step)
        m = self.config.data.microbatch_size
        if self.routing is not None:
            self.routing.begin_step(step, self.clock(), self.rng)
        losses = await asyncio.gather(*[self.run_microbatch(step, i, x[i * m:(i + 1) * m], y[i * m:(i + 1) * m])
                                        for i in range(self.config.data.microbatches_per_step)])
        if self.routing is not None:
            self.routing.end_step()
        return sum(losses) / x.shape[0]

    # -- evaluation --------------------------------------------------------------------------
    async def _eval_microbatch(self, stages: tuple[int, ...], mb_id: str, x: torch.Tensor, y: torch.Tensor) -> float:
        for attempt in range(self.config.network.max_retries):
            try:
                h = x
                for stage in stages:
                    _, h = await self._forward_hop(stage, f"{mb_id}:{attempt}", h, keep_context=False)
            except HopFailed as e:
                logger.warning("eval microbatch %s: %s; restarting it", mb_id, e)
                continue
            return float(loss_sum(self.config.data, h, y))
        raise HopFailed(f"eval microbatch {mb_id} could not complete a forward pass in "
                        f"{self.config.network.max_retries} attempts")

    async def evaluate(self, stages: tuple[int, ...] | None = None, batches: int = 1) -> dict:
        """Loss (and perplexity, for text) on ``batches`` held-out batches, forward only through ``stages``.

        ``stages`` (default: all) must start with stage 0 and end with the last
        stage (:func:`parse_stage_subset`); leaving middle stages out shows how
        a model trained with skips degrades when layers are dropped.
        """
        stages = tuple(range(self.config.num_stages)) if stages is None else tuple(stages)
        refresher = asyncio.create_task(self._refresh_loop())
        started, total, samples = time.time(), 0.0, 0
        m = self.config.data.microbatch_size
        try:
            for b in range(batches):
                x, y = self.batches.eval_batch(self.config.data.batch_size, index=b)
                parts = range(0, x.shape[0], m)
                losses = await asyncio.gather(*[self._eval_microbatch(stages, f"eval:{self.trainer_id}:{b}:{i // m}",
                                                                      x[i:i + m], y[i:i + m]) for i in parts])
                total += sum(losses)
                samples += x.shape[0]
        finally:
            refresher.cancel()
            await self.client.close()
        loss = total / samples
        return {"stages": list(stages),
                "skipped": sorted(set(range(self.config.num_stages)) - set(stages)),
                "batches": batches, "samples": samples, "loss": loss,
                "perplexity": math.exp(min(loss, 700.0)) if self.config.data.kind == "text" else None,
                "seconds": time.time() - started}

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
        return {"steps": done - start_step, "start_step": start_step, "next_step": done,
                "stopped_early": done < steps, "samples": samples, "first_loss": losses[0] if losses else None,
                "final_loss": losses[-1] if losses else None, "seconds": time.time() - started,
                "microbatches": acc.started, "applied": acc.applied, "duplicates": acc.duplicates,
                "partially_applied": len(acc.incomplete()), "hop_retries": acc.hop_retries, "bans": acc.bans,
                "forward_restarts": acc.forward_restarts, "peers": self.live_peers(),
                "skip_ratio": self.config.routing.skip_ratio, "replans": acc.replans,
                "microbatches_per_stage": acc.per_stage(self.config.num_stages),
                "stages_visited": acc.stages_visited()}
