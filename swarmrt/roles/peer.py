"""A stage peer: joins the DHT, serves one stage over gRPC, heartbeats, drains on SIGTERM.

Lifecycle: start the DHT node -> pick a stage (given, or the one with the least
capacity) -> build the stage module -> start the gRPC service -> take over the
stage's state (from a serving peer of the stage; else, or with ``--resume``,
from the newest checkpoint) -> announce ``serving`` and heartbeat (writing
periodic checkpoints if this peer is the stage's writer) -> on SIGTERM/SIGINT
announce ``leaving`` (routers stop picking it at once), refuse new forwards,
finish what is in flight (up to the grace period), write a checkpoint if it is
the last peer of its stage, leave, exit 0. A second signal exits at once,
still reaping the DHT child and p2pd.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import random
import time

from torch import nn

from swarmrt.checkpoint.policy import (checkpoint_due, is_checkpoint_writer, leave_checkpoint_due,
                                            training_config_hash)
from swarmrt.config import ConfigError, RunConfig
from swarmrt.routing.wiring import choose_stage
from swarmrt.data import sample_input
from swarmrt.models.build import build_layers, partition_hash, stage_ranges
from swarmrt.discovery import dht as dht_records
from swarmrt.wire.client import StageClient
from swarmrt.wire.emulation import server_interceptors
from swarmrt.pipeline.service import StageServicer
from swarmrt.wire.server import start_server
from swarmrt.checkpoint import store as ckpt
from swarmrt.roles.proc import install_stop_handlers
from swarmrt.pipeline.worker import StageWorker, infer_input_spec

logger = logging.getLogger("swarmrt.peer")


@dataclasses.dataclass(frozen=True)
class PeerOptions:
    initial_peers: tuple[str, ...]
    """Multiaddrs of DHT peers to join through."""
    stage: int | None = None
    """Stage to serve; None picks the stage with the least capacity."""
    port: int = 0
    """gRPC port (0: any free port)."""
    grace_s: float = 20.0
    """How long a draining peer finishes in-flight work before it leaves."""
    ready_file: str | None = None
    """Written (with the gRPC address) once the peer serves."""
    ledger: str | None = None
    """Append every applied microbatch id here (tests count exactly-once with it)."""
    compute_delay_s: float = 0.0
    """Emulated extra compute time per forward and per backward (benchmarks)."""
    slowdown: float = 1.0
    """Multiply real compute time by this factor (fault tests)."""
    resume: bool = False
    """Load the stage's newest checkpoint even if other peers serve the stage (fail if none)."""
    net_rules: str | None = None
    """Emulated links and RPC faults (``swarmrt.wire.emulation``), re-read when the file changes."""


def say(message: str) -> None:
    print(message, flush=True)


async def _pick_stage(dht, config: RunConfig, rng: random.Random) -> tuple[int, str]:
    capacity = {}
    for s in range(config.num_stages):
        records = await asyncio.to_thread(dht_records.read_stage, dht, config.run.id, s)
        capacity[s] = sum(r.throughput if r.throughput > 0 else 1.0 for r in records if r.state != "leaving")
    return choose_stage(capacity, config.num_stages, rng)


async def _download_state(worker: StageWorker, config: RunConfig, donors: list[dht_records.StageRecord]) -> str | None:
    client = StageClient(config.network.max_tensor_mb)
    try:
        for donor in sorted(donors, key=lambda r: -r.version):
            try:
                data = await client.get_state(donor.address, config.run.id, worker.stage, timeout=60.0)
                worker.load_state_bytes(data)
                return f"loaded state (version {worker.version}, {len(data)} bytes) from {donor.peer_id}"
            except Exception as e:  # try the next donor
                logger.warning("state download from %s failed: %s", donor.peer_id, e)
        return None
    finally:
        await client.close()


class Checkpointer:
    """Periodic and on-leave checkpoints of one stage, per ``[checkpoint]``."""

    def __init__(self, config: RunConfig, worker: StageWorker, peer_id: str, partition: str, compute):
        self.section = config.checkpoint
        self.config, self.worker, self.peer_id, self.partition = config, worker, peer_id, partition
        self.config_hash = training_config_hash(config)
        self.compute = compute  # runs a function on the stage's compute thread
        self.last_step, self.last_time = worker.version, time.monotonic()

    def resume(self) -> str | None:
        """Load the newest checkpoint of the stage; None when there is none."""
        found = ckpt.load_latest_checkpoint(self.section.location, self.config.run.id, self.worker.stage,
                                            self.partition)
        if found is None:
            return None
        meta, state, path = found
        if meta.config_hash != self.config_hash:
            logger.warning("checkpoint %s was written under config %s, this run's is %s", path, meta.config_hash,
                           self.config_hash)
        self.worker.load_state_bytes(state)
        self.last_step = self.worker.version
        return f"resumed from checkpoint {path} (step {meta.step})"

    async def write(self, reason: str) -> str:
        state = await self.compute(self.worker.state_bytes)
        step = self.worker.version
        path = await asyncio.to_thread(ckpt.save_checkpoint, self.section.location, self.config.run.id,
                                       self.worker.stage, step, state, config_hash=self.config_hash,
                                       partition_hash=self.partition, writer=self.peer_id, keep=self.section.keep)
        self.last_step, self.last_time = step, time.monotonic()
        say(f"stage {self.worker.stage}: checkpoint step {step} written to {path} ({reason})")
        return path

    async def maybe_periodic(self, serving_ids: list[str]) -> None:
        due, reason = checkpoint_due(self.worker.version, self.last_step, time.monotonic(), self.last_time,
                                     self.section)
        if not due:
            return
        writer, why = is_checkpoint_writer(self.peer_id, serving_ids)
        if writer:
            await self.write(reason)
        else:  # another peer of the stage writes this one; move on together
            self.last_step, self.last_time = self.worker.version, time.monotonic()
            logger.info("checkpoint due (%s) but %s", reason, why)

    async def maybe_on_leave(self, serving_ids: list[str]) -> None:
        due, reason = leave_checkpoint_due(self.peer_id, serving_ids, self.section)
        if due:
            await self.write(reason)


async def serve_peer(config: RunConfig, options: PeerOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    install_stop_handlers(loop, stop)
    net = config.network
    dht = await asyncio.to_thread(dht_records.start_dht, list(options.initial_peers), net.host)
    servicer = server = None
    try:
        peer_id = str(dht.peer_id)
        if options.stage is None:
            stage, reason = await _pick_stage(dht, config, random.Random(peer_id))
            say(f"picked stage {stage}: {reason}")
        else:
            stage = options.stage
        layers = build_layers(config)
        ranges = stage_ranges(config, layers)
        start, end = ranges[stage]
        worker = StageWorker(nn.Sequential(*layers[start:end]), config, stage,
                             infer_input_spec(layers[:start], sample_input(config.data)),
                             compute_delay_s=options.compute_delay_s, slowdown=options.slowdown,
                             ledger_path=options.ledger)
        del layers
        servicer = StageServicer(worker, config.run.id, peer_id, net.max_tensor_mb * 2**20)

        async def compute(fn, *args):
            return await loop.run_in_executor(servicer.executor, fn, *args)

        if config.local_sgd.enabled and worker.params:  # before the gRPC server starts: the averager forks
            from swarmrt.local_sgd.averaging import StageAverager
            from swarmrt.local_sgd.outer import OuterSync

            averager = StageAverager(dht, f"{config.run.id}_stage{stage}", worker.params, config.local_sgd,
                                     codec=config.compression.pseudo_gradients, state_codec=config.compression.state)
            worker.attach("outer", OuterSync(worker, averager, config.local_sgd,
                                             submit_to_compute=servicer.executor.submit,
                                             log=lambda line: say(f"stage {stage}: {line}")))
        checkpoints = Checkpointer(config, worker, peer_id, partition_hash(config, ranges), compute) \
            if config.checkpoint.enabled else None
        if options.resume and checkpoints is None:
            raise ConfigError("--resume needs [checkpoint] location in the run config")
        server, port = await start_server(servicer, net.host, options.port, net.max_tensor_mb,
                                          interceptors=server_interceptors(options.net_rules, worker))
        address = f"{net.host}:{port}"

        # take over the stage's state: a live peer of the stage first, else the newest checkpoint
        serving = [r for r in await asyncio.to_thread(dht_records.read_stage, dht, config.run.id, stage)
                   if r.state == "serving" and r.peer_id != peer_id]
        note = None
        if checkpoints is not None and (options.resume or not serving):
            note = checkpoints.resume()
            if note is None and options.resume:
                raise ckpt.CheckpointError(f"--resume: no checkpoint of stage {stage} of run {config.run.id!r} "
                                 f"under {config.checkpoint.location}")
        if note is None and serving:
            note = await _download_state(worker, config, serving)
        note = note or "first peer of its stage: starts from the initial weights"

        def record(state: str) -> dht_records.StageRecord:
            stats = worker.stats()
            return dht_records.StageRecord(peer_id=peer_id, stage=stage, address=address,
                                           throughput=float(stats["throughput"]), load=servicer.inflight,
                                           version=int(stats["version"]), state=state, heartbeat=time.time())

        async def announce(state: str) -> None:
            await asyncio.to_thread(dht_records.announce, dht, config.run.id, record(state), net.record_ttl_s)
            await asyncio.to_thread(dht_records.announce_run, dht, config.run.id, config.num_stages,
                                    training_config_hash(config), net.record_ttl_s)

        async def serving_ids() -> list[str]:
            records = await asyncio.to_thread(dht_records.read_stage, dht, config.run.id, stage)
            return [r.peer_id for r in records if r.state == "serving"]

        servicer.state = "serving"
        await announce("serving")
        if options.ready_file:
            path = pathlib.Path(options.ready_file)
            path.with_suffix(".tmp").write_text(f"{stage} {address} {peer_id}\n")
            path.with_suffix(".tmp").rename(path)
        say(f"serving stage {stage} (layers {start}..{end - 1}) at {address} as {peer_id}; {note}")

        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=net.heartbeat_s)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                break
            try:
                await announce("serving")
                if checkpoints is not None:
                    await checkpoints.maybe_periodic(await serving_ids())
            except Exception as e:  # a missed heartbeat is not fatal; the next one may pass
                logger.warning("heartbeat failed: %s", e)

        # drain: routers stop picking us at once; finish in-flight work within the grace period
        servicer.state = "leaving"
        drain_started = time.monotonic()
        try:
            await announce("leaving")
        except Exception as e:
            logger.warning("could not announce leaving: %s", e)
        try:
            await asyncio.wait_for(servicer.idle.wait(), timeout=options.grace_s)
        except asyncio.TimeoutError:
            logger.warning("grace period over with %d requests in flight", servicer.inflight)
        if checkpoints is not None:
            try:
                others = [p for p in await serving_ids() if p != peer_id]
                await asyncio.wait_for(checkpoints.maybe_on_leave([peer_id, *others]),
                                       timeout=max(1.0, options.grace_s - (time.monotonic() - drain_started)))
            except Exception as e:
                logger.error("could not write the leaving checkpoint: %s", e)
        say(f"stage {stage} peer {peer_id} left after applying {worker.microbatches_applied} microbatches")
        return 0
    finally:
        if server is not None:
            await server.stop(grace=1.0)
        if servicer is not None:
            servicer.close()
            servicer.worker.close()
        await asyncio.to_thread(dht.shutdown)
