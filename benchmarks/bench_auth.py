"""The cost of membership: trainer step time in an open run and in a run with a join token, side by side.

One process holds the whole swarm: the demo's model (swarmrt/examples/tiny_llama.toml: 3 stages,
4 microbatches of 4 samples a step), one peer per stage serving its real StageServicer over real
gRPC on 127.0.0.1, a real hivemind DHT (a bootstrap, a node that announces the stage records, the
trainer's client node) and the real Trainer. The two runs differ only in membership:

- open: no authorizer, no record validators, no credential interceptors;
- member: every DHT request signed and checked (hivemind's TokenAuthorizerBase), stage records
  owner-signed and checked on read, every gRPC call carrying an HMAC credential checked by the
  peer's server interceptor.

The runs come in pairs (open then member, then member then open, ...) so both share whatever
else loads the machine; each times ``--steps`` steps after ``--warmup`` steps. Two figures per run:
wall seconds per step, and CPU seconds per step (this process, where the stages and the trainer
compute, plus the mode's three DHT processes, where DHT requests are signed and checked), which
other load on a shared machine disturbs much less. Prints the median of each and the median of
the per-pair ratios member/open. Then the per-call cost, which end-to-end noise hides: the
credential alone (made and checked), and the CPU of an ``Info`` round trip over real gRPC with and
without it (alternating blocks), times the calls of a step, over an open step.

    python benchmarks/bench_auth.py [--steps 30] [--warmup 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import time
from pathlib import Path

from swarmrt import auth
from swarmrt.auth.credential import credential_problem, make_credential
from swarmrt.auth.token import issue_token, load_or_create_run_key
from swarmrt.config import load_config
from swarmrt.discovery import dht as dht_io
from swarmrt.roles.trainer import Trainer
from swarmrt.testing.inprocess import InProcessSwarm
from swarmrt.wire.client import StageClient
from swarmrt.wire.server import start_server

CONFIG = Path(__file__).resolve().parent.parent / "swarmrt" / "examples" / "tiny_llama.toml"


class Mode:
    """One membership mode's DHT nodes (kept across repeats) and its gRPC interceptors."""

    def __init__(self, name: str, token, run_id: str, record_ttl_s: float):
        self.name, self.token = name, token
        security = auth.dht_kwargs(token, run_id, record_ttl_s)
        self.boot = dht_io.start_dht([], **security)
        maddrs = dht_io.visible_maddrs(self.boot)
        self.announcer = dht_io.start_dht(maddrs, **auth.dht_kwargs(token, run_id, record_ttl_s))
        self.trainer_dht = dht_io.start_dht(maddrs, client_mode=True, **auth.dht_kwargs(token, run_id, record_ttl_s))

    def close(self) -> None:
        for dht in (self.trainer_dht, self.announcer, self.boot):
            dht_io.stop_dht(dht)


def cpu_seconds(pids, own: bool = True) -> float:
    """CPU seconds (user + system) used so far by this process (``own``) and the processes ``pids``
    (Linux /proc)."""
    used = sum(os.times()[:2]) if own else 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return used


async def timed_run(config, mode: Mode, steps: int, warmup: int) -> tuple[float, float, float]:
    """(wall, CPU) seconds per step of one trainer run over a fresh in-process swarm served over gRPC,
    and the CPU seconds per second of the DHT processes alone."""
    swarm = InProcessSwarm.build(config, peers_per_stage=1)
    servers, records = [], []
    try:
        for record in swarm.records:
            server, port = await start_server(swarm.servicers[record.peer_id], "127.0.0.1", 0,
                                              config.network.max_tensor_mb,
                                              interceptors=auth.server_interceptors(mode.token))
            servers.append(server)
            records.append(dataclasses.replace(record, address=f"127.0.0.1:{port}", heartbeat=time.time()))
        for record in records:
            assert dht_io.announce(mode.announcer, config.run.id, record, ttl=3 * config.network.record_ttl_s)
        client = StageClient(config.network.max_tensor_mb, credentials=auth.call_credentials(mode.token))
        try:
            trainer = Trainer(config, mode.trainer_dht, client=client, trainer_id=f"bench-{mode.name}")
            await trainer.run(warmup)
            pids = [d.pid for d in (mode.boot, mode.announcer, mode.trainer_dht)]
            start, cpu, dht_cpu = time.perf_counter(), cpu_seconds(pids), cpu_seconds(pids, own=False)
            await trainer.run(warmup + steps, start_step=warmup)
            took = time.perf_counter() - start
            return took / steps, (cpu_seconds(pids) - cpu) / steps, (cpu_seconds(pids, own=False) - dht_cpu) / took
        finally:
            await client.close()
    finally:
        for server in servers:
            await server.stop(0)
        swarm.close()


async def per_call_delta(token, blocks: int = 20, block: int = 300) -> tuple[float, float]:
    """Median CPU microseconds (client and server together: both in this process) of an ``Info`` round
    trip over real gRPC (one in-process stage server that checks credentials, one that does not),
    without and with the credential, in alternating blocks."""
    from swarmrt.testing.intruder import _Report, _fake_servicer  # a stage service that answers at once

    servers, clients = [], []
    for interceptors_of in (lambda: (), lambda: auth.server_interceptors(token)):
        server, port = await start_server(_fake_servicer(_Report(os.devnull)), "127.0.0.1", 0, 8,
                                          interceptors=interceptors_of())
        servers.append((server, f"127.0.0.1:{port}"))
    clients = [StageClient(8), StageClient(8, credentials=auth.call_credentials(token))]
    times: list[list[float]] = [[], []]
    try:
        for b in range(blocks):
            for i in (0, 1) if b % 2 == 0 else (1, 0):
                address = servers[i][1]
                await clients[i].info(address)  # connected
                start = time.process_time()
                for _ in range(block):
                    await clients[i].info(address)
                times[i].append((time.process_time() - start) / block * 1e6)
    finally:
        for client in clients:
            await client.close()
        for server, _ in servers:
            await server.stop(0)
    return statistics.median(times[0]), statistics.median(times[1])


def credential_cost(n: int = 20000) -> float:
    """Microseconds to make and check one call's credential."""
    secret, method = b"k" * 32, "/swarmrt.Stage/Forward"
    start = time.perf_counter()
    for _ in range(n):
        assert credential_problem(make_credential(secret, method, time.time()), secret, method, time.time()) is None
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config(CONFIG)
    # records live long enough for a whole run (announced once, not on a heartbeat)
    config = dataclasses.replace(config, network=dataclasses.replace(config.network, record_ttl_s=60.0))
    token = issue_token(load_or_create_run_key(None), time.time())
    modes = [Mode("open", None, config.run.id, config.network.record_ttl_s),
             Mode("member", token, config.run.id, config.network.record_ttl_s)]
    wall: dict[str, list[float]] = {m.name: [] for m in modes}
    cpu: dict[str, list[float]] = {m.name: [] for m in modes}
    dht: dict[str, list[float]] = {m.name: [] for m in modes}
    try:
        for r in range(args.repeats):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                w, c, d = asyncio.run(timed_run(config, mode, args.steps, args.warmup))
                wall[mode.name].append(w)
                cpu[mode.name].append(c)
                dht[mode.name].append(d)
                print(f"repeat {r + 1} {mode.name:6s} {w * 1000:8.1f} ms/step wall {c * 1000:8.1f} ms/step CPU",
                      flush=True)
    finally:
        for mode in modes:
            mode.close()
    calls = 2 * config.num_stages * (config.data.batch_size // config.data.microbatch_size)
    print(f"\n| {args.repeats} pairs of runs, {args.steps} steps each | open (no join token) | member (join token) "
          "| member/open (median of the pairs) |")
    print("| --- | ---: | ---: | ---: |")
    for name, figures in (("wall ms/step", wall), ("CPU ms/step", cpu)):
        ratios = [m / o for o, m in zip(figures["open"], figures["member"])]
        print(f"| {name} | {statistics.median(figures['open']) * 1000:.1f} "
              f"| {statistics.median(figures['member']) * 1000:.1f} | **{statistics.median(ratios):.3f}** |")
    open_wall, open_cpu = statistics.median(wall["open"]), statistics.median(cpu["open"])
    per_call = credential_cost()
    plain_us, checked_us = asyncio.run(per_call_delta(token))
    added = (checked_us - plain_us) * calls / 1e6
    print(f"\ncredential alone, made and checked: {per_call:.1f} us per call")
    print(f"Info round trip over gRPC, CPU of client and server: {plain_us:.0f} us open, {checked_us:.0f} us with "
          f"the credential (+{checked_us - plain_us:.0f} us); x {calls} calls a step = {added * 1000:.2f} ms: "
          f"{added / open_cpu * 100:.2f}% of an open step's CPU ({added / open_wall * 100:.2f}% of its wall time)")
    extra = statistics.median(dht["member"]) - statistics.median(dht["open"])
    print(f"DHT processes (signing and checking requests, records): {statistics.median(dht['open']) * 1000:.0f} "
          f"ms CPU per second open, {statistics.median(dht['member']) * 1000:.0f} member (+{extra * 1000:.0f} ms/s, "
          f"a trainer reading the swarm every {config.network.heartbeat_s / 2:g} s): "
          f"{extra * open_wall / open_cpu * 100:.2f}% of an open step's CPU at this step time")

if __name__ == "__main__":
    main()
