"""Peer-to-peer hops (``network.chain_hops``) against the trainer relaying every hop, side by side.

Two sections (``--sections bytes,geo``):

1. ``bytes``: bytes through the trainer's link per trained microbatch, relayed vs chained, on the
   demo model (``swarmrt/examples/tiny_llama.toml``: 3 stages, hidden 64, byte vocabulary) and on a
   larger one (``--large``: 4 stages, hidden 512, vocabulary 8192). In-process peers running the real
   handlers; every call the trainer makes is framed as on the wire and counted
   (:class:`swarmrt.testing.inprocess.CountingClient`).
2. ``geo``: step time of a real swarm (separate processes on 127.0.0.1, the demo model cut into 4
   stages, one peer each) whose links are emulated from the geo-aws18 scenario (SkipPipe's AWS
   regions): each peer and the trainer sit at a scenario node, and every call holds for that pair's
   latency plus bytes / bandwidth, peer-to-peer calls included. The scenario's activations are 64 MiB;
   the demo's are 32 KiB, so bandwidths are scaled by that ratio, and every time (latency and
   transfer) by ``--time-scale`` so a step takes seconds. The same swarm trains ``--steps`` steps
   relayed, then chained (two trainers in turn, at the same node); the median step time of each and
   their ratio are printed, for each trainer placement in ``--trainer-nodes``.

    python benchmarks/bench_chain.py [--sections bytes,geo] [--steps 8] [--time-scale 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from swarmrt.config import config_from_dict, load_config  # noqa: E402
from swarmrt.roles.trainer import Trainer  # noqa: E402
from swarmrt.testing.inprocess import CountingClient, InProcessSwarm  # noqa: E402

DEMO = REPO / "swarmrt" / "examples" / "tiny_llama.toml"
SCENARIO = REPO / "swarmrt" / "sim" / "scenarios" / "geo-aws18.json"
PEER_NODES = (0, 6, 10, 14)  # one node of each of the scenario's 4 stages: Sofia, Oregon, Virginia, Sydney


def _with(config, **network):
    raw = config.to_dict()
    raw["network"] = {**raw["network"], **network}
    return config_from_dict(raw)


def trainer_bytes(config, steps: int) -> dict[bool, float]:
    """Bytes through the trainer's link per microbatch, relayed (False) and chained (True)."""
    out = {}
    for chain in (False, True):
        cfg = _with(config, chain_hops=chain)
        swarm = InProcessSwarm.build(cfg, peers_per_stage=1)
        try:
            client = CountingClient(swarm.client)
            trainer = Trainer(cfg, dht=None, client=client, trainer_id="bench")
            trainer.view_peers(swarm.records)

            async def go():
                for step in range(steps):
                    await trainer.train_step(step)

            asyncio.run(go())
            out[chain] = client.bytes / trainer.accounting.applied
        finally:
            swarm.close()
    return out


def bytes_section(args) -> None:
    demo = load_config(DEMO)
    large = config_from_dict({**demo.to_dict(),
                              "model": {"factory": "swarmrt.models:tiny_llama",
                                        "kwargs": {"vocab_size": 8192, "hidden_size": 512, "layers": 4, "heads": 8},
                                        "stages": 4},
                              "data": {**demo.to_dict()["data"], "seq_len": 64}})
    print("bytes through the trainer's link per microbatch (fp16 activations and gradients)")
    print(f"{'model':<34} {'relayed':>12} {'chained':>12} {'cut':>8}")
    for name, config in (("demo (3 stages, hidden 64)", demo), ("larger (4 stages, hidden 512)", large)):
        sent = trainer_bytes(config, args.bytes_steps)
        print(f"{name:<34} {sent[False]:>12,.0f} {sent[True]:>12,.0f} {sent[False] / sent[True]:>7.1f}x")


def step_times(metrics: list[dict]) -> list[float]:
    times = [m["time"] for m in metrics]
    return [b - a for a, b in zip(times, times[1:])]


def geo_section(args) -> None:
    from swarmrt.localswarm.swarm import LocalSwarm

    scenario = json.loads(SCENARIO.read_text())
    demo = load_config(DEMO)
    config = config_from_dict({**demo.to_dict(), "model": {**demo.to_dict()["model"], "stages": 4},
                               "network": {**demo.to_dict()["network"], "forward_timeout_s": 60.0,
                                           "backward_timeout_s": 60.0}})
    d = config.data
    activation = d.microbatch_size * d.seq_len * 64 * 2  # fp16 hidden states of one microbatch
    bandwidth_scale = activation / scenario["activation_bytes"] / args.time_scale
    print(f"\ngeo-aws18 emulated: 4 stages x 1 peer at nodes {PEER_NODES}; latencies x{args.time_scale}, "
          f"bandwidths x{bandwidth_scale:.3g} (a {activation}-byte activation takes what the scenario's "
          f"{scenario['activation_bytes']} bytes take, x{args.time_scale})")
    print(f"{'trainer at node':<26} {'relayed s/step':>15} {'chained s/step':>15} {'chained/relayed':>16}")
    for node in (int(n) for n in args.trainer_nodes.split(",")):
        with tempfile.TemporaryDirectory() as tmp, LocalSwarm(config, peers_per_stage=1, workdir=tmp) as swarm:
            chained_config = pathlib.Path(tmp) / "chained.json"
            chained_config.write_text(json.dumps(_with(config, chain_hops=True).to_dict()))
            nodes = {role.name: PEER_NODES[role.stage] for role in swarm.peers()}
            nodes.update({"trainer-relayed": node, "trainer-chained": node})
            swarm.emulate_network(scenario=SCENARIO, nodes=nodes, latency_scale=args.time_scale,
                                  bandwidth_scale=bandwidth_scale)
            medians = []
            for name, extra in (("trainer-relayed", []), ("trainer-chained", ["--config", str(chained_config)])):
                role = swarm.start_trainer(args.steps + 1, extra_args=extra, name=name)
                swarm.wait_trainer(role, timeout=1800)
                medians.append(statistics.median(step_times(swarm.metrics(role))))
        where = scenario["nodes"][node]["location"]
        print(f"{f'{node} ({where})':<26} {medians[0]:>15.2f} {medians[1]:>15.2f} {medians[1] / medians[0]:>16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="bytes,geo")
    parser.add_argument("--bytes-steps", type=int, default=2, help="steps per run of the bytes section")
    parser.add_argument("--steps", type=int, default=8, help="steps per trainer of the geo section")
    parser.add_argument("--time-scale", type=float, default=0.1, help="geo: every emulated time x this")
    parser.add_argument("--trainer-nodes", default="0,2",
                        help="geo: scenario nodes the trainer sits at (0 Sofia: beside stage 0's peer; 2 Ireland)")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if "bytes" in sections:
        bytes_section(args)
    if "geo" in sections:
        geo_section(args)


if __name__ == "__main__":
    main()
