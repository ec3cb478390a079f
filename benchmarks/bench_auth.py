"""The cost of membership: trainer step time in an open run and in a run with a join token, side by side.

One process holds the whole swarm: the demo's model (swarmrt/examples/tiny_llama.toml: 3 stages,
4 microbatches of 4 samples a step), one peer per stage serving its real StageServicer over real
gRPC on 127.0.0.1, a real hivemind DHT (a bootstrap, a node that announces the stage records, the
trainer's client node) and the real Trainer. The two runs differ only in membership:

- open: no authorizer, no record validators, no credential interceptors;
- member: every DHT request signed and checked (hivemind's TokenAuthorizerBase), stage records
  owner-signed and checked on read, every gRPC call carrying an HMAC credential checked by the
  peer's server interceptor.

The runs alternate (open, member, open, member, ...) so both share whatever else loads the
machine; each times ``--steps`` steps after ``--warmup`` steps. Prints the median seconds per step
of each, the ratio, and the per-call cost of the credential alone.

    python benchmarks/bench_auth.py [--steps 30] [--warmup 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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


async def timed_run(config, mode: Mode, steps: int, warmup: int) -> float:
    """Seconds per step of one trainer run over a fresh in-process swarm served over gRPC."""
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
        client = StageClient(config.network.max_tensor_mb, interceptors=auth.client_interceptors(mode.token))
        try:
            trainer = Trainer(config, mode.trainer_dht, client=client, trainer_id=f"bench-{mode.name}")
            await trainer.run(warmup)
            start = time.perf_counter()
            await trainer.run(warmup + steps, start_step=warmup)
            return (time.perf_counter() - start) / steps
        finally:
            await client.close()
    finally:
        for server in servers:
            await server.stop(0)
        swarm.close()


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
    times: dict[str, list[float]] = {m.name: [] for m in modes}
    try:
        for r in range(args.repeats):
            for mode in modes:
                times[mode.name].append(asyncio.run(timed_run(config, mode, args.steps, args.warmup)))
                print(f"repeat {r + 1} {mode.name:6s} {times[mode.name][-1] * 1000:8.1f} ms/step", flush=True)
    finally:
        for mode in modes:
            mode.close()
    open_s, member_s = statistics.median(times["open"]), statistics.median(times["member"])
    calls = 2 * config.num_stages * (config.data.batch_size // config.data.microbatch_size)
    print(f"\n| run | median ms/step ({args.repeats} runs of {args.steps} steps) |")
    print("| --- | ---: |")
    print(f"| open (no join token) | {open_s * 1000:.1f} |")
    print(f"| member (join token) | {member_s * 1000:.1f} |")
    print(f"| **cost of membership** | **{(member_s / open_s - 1) * 100:+.1f}%** of step time |")
    per_call = credential_cost()
    print(f"\ncredential, made and checked: {per_call:.1f} us per call; {calls} calls a step: "
          f"{per_call * calls / 1000:.2f} ms ({per_call * calls / 1e6 / member_s * 100:.2f}% of a member step)")


if __name__ == "__main__":
    main()
