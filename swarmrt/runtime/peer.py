"""A stage peer: joins the DHT, serves one stage over gRPC, heartbeats, drains on SIGTERM.

Lifecycle: start the DHT node -> pick a stage (given, or the one with the least
capacity) -> build the stage module -> start the gRPC service -> if the stage
already has peers, download their state -> announce ``serving`` and heartbeat
-> on SIGTERM/SIGINT announce ``leaving``, refuse new forwards, finish what is
in flight (up to the grace period), leave, exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import random
import time

from swarmrt.core.config import RunConfig
from swarmrt.core.routing import choose_stage
from swarmrt.data import sample_input
from swarmrt.models.build import build_layers, stage_ranges
from swarmrt.net import dht as dht_records
from swarmrt.net.client import StageClient
from swarmrt.net.emulation import server_interceptors
from swarmrt.net.server import StageServicer, start_server
from swarmrt.runtime.proc import install_stop_handlers
from swarmrt.runtime.stage import StageWorker, infer_input_spec

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
    net_rules: str | None = None
    """Emulated links and RPC faults (``swarmrt.net.emulation``), re-read when the file changes."""


async def _pick_stage(dht, config: RunConfig, rng: random.Random) -> tuple[int, str]:
    capacity = {}
    for s in range(config.num_stages):
        records = await asyncio.to_thread(dht_records.read_stage, dht, config.run.id, s)
        capacity[s] = sum(r.throughput if r.throughput > 0 else 1.0 for r in records if r.state != "leaving")
    return choose_stage(capacity, config.num_stages, rng)


async def _download_state(worker: StageWorker, config: RunConfig, dht, stage: int, self_id: str) -> str:
    records = await asyncio.to_thread(dht_records.read_stage, dht, config.run.id, stage)
    donors = sorted((r for r in records if r.state == "serving" and r.peer_id != self_id),
                    key=lambda r: -r.version)
    if not donors:
        return "first peer of its stage: starts from the initial weights"
    client = StageClient(config.network.max_tensor_mb)
    try:
        for donor in donors:
            try:
                data = await client.get_state(donor.address, config.run.id, stage, timeout=60.0)
                worker.load_state_bytes(data)
                return f"loaded state (version {worker.version}, {len(data)} bytes) from {donor.peer_id}"
            except Exception as e:  # try the next donor
                logger.warning("state download from %s failed: %s", donor.peer_id, e)
        return "state download failed from every peer; starting from the initial weights"
    finally:
        await client.close()


async def serve_peer(config: RunConfig, options: PeerOptions) -> int:
    stop = asyncio.Event()
    install_stop_handlers(asyncio.get_running_loop(), stop)
    net = config.network
    dht = await asyncio.to_thread(dht_records.start_dht, list(options.initial_peers), net.host)
    servicer = server = None
    try:
        peer_id = str(dht.peer_id)
        rng = random.Random(hash(peer_id))
        if options.stage is None:
            stage, reason = await _pick_stage(dht, config, rng)
            logger.info("picked stage %d: %s", stage, reason)
        else:
            stage = options.stage
            if not 0 <= stage < config.num_stages:
                raise ValueError(f"--stage {stage}: the run has stages 0..{config.num_stages - 1}")
        layers = build_layers(config)
        start, end = stage_ranges(config, layers)[stage]
        import torch.nn as nn

        module = nn.Sequential(*layers[start:end])
        spec = infer_input_spec(layers[:start], sample_input(config.data))
        del layers
        worker = StageWorker(module, config, stage, spec, compute_delay_s=options.compute_delay_s,
                             slowdown=options.slowdown, ledger_path=options.ledger)
        servicer = StageServicer(worker, config.run.id, peer_id, net.max_tensor_mb * 2**20)
        server, port = await start_server(servicer, net.host, options.port, net.max_tensor_mb,
                                          interceptors=server_interceptors(options.net_rules, worker))
        address = f"{net.host}:{port}"
        note = await _download_state(worker, config, dht, stage, peer_id)

        def record(state: str) -> dht_records.StageRecord:
            stats = worker.stats()
            return dht_records.StageRecord(peer_id=peer_id, stage=stage, address=address,
                                           throughput=float(stats["throughput"]), load=servicer.inflight,
                                           version=int(stats["version"]), state=state, heartbeat=time.time())

        servicer.state = "serving"
        await asyncio.to_thread(dht_records.announce, dht, config.run.id, record("serving"), net.record_ttl_s)
        await asyncio.to_thread(dht_records.announce_run, dht, config.run.id, config.num_stages, config.digest(),
                                net.record_ttl_s)
        if options.ready_file:
            path = pathlib.Path(options.ready_file)
            path.with_suffix(".tmp").write_text(f"{stage} {address} {peer_id}\n")
            path.with_suffix(".tmp").rename(path)
        print(f"serving stage {stage} (layers {start}..{end - 1}) at {address} as {peer_id}; {note}", flush=True)

        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=net.heartbeat_s)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                break
            try:
                await asyncio.to_thread(dht_records.announce, dht, config.run.id, record("serving"), net.record_ttl_s)
                await asyncio.to_thread(dht_records.announce_run, dht, config.run.id, config.num_stages,
                                        config.digest(), net.record_ttl_s)
            except Exception as e:  # a missed heartbeat is not fatal; the next one may pass
                logger.warning("heartbeat failed: %s", e)

        # drain: routers stop picking us at once; finish in-flight work within the grace period
        servicer.state = "leaving"
        try:
            await asyncio.to_thread(dht_records.announce, dht, config.run.id, record("leaving"), net.record_ttl_s)
        except Exception as e:
            logger.warning("could not announce leaving: %s", e)
        try:
            await asyncio.wait_for(servicer.idle.wait(), timeout=options.grace_s)
        except asyncio.TimeoutError:
            logger.warning("grace period over with %d requests in flight", servicer.inflight)
        print(f"stage {stage} peer {peer_id} left after applying {worker.microbatches_applied} microbatches",
              flush=True)
        return 0
    finally:
        if server is not None:
            await server.stop(grace=1.0)
        if servicer is not None:
            servicer.close()
            servicer.worker.close()
        await asyncio.to_thread(dht.shutdown)
