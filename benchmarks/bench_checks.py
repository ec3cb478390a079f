"""Cost of checked work: step time with a fraction of forward hops re-run on a second peer, over none.

Stage peers run in this process (:class:`swarmrt.testing.inprocess.InProcessSwarm`: the real
stage handler, every request and reply serialized as on the wire, no sockets), 3 peers per
stage, so every check can find a second (and a third) peer. Rounds of ``--steps`` training
steps alternate between ``verify_fraction = 0`` and ``--fraction`` on the same peers; each
round gets a fresh trainer. Reply checks (dtype, shape, finiteness) run in both: they are not
optional. Prints the median step time of each and their ratio, in wall-clock seconds and in CPU
seconds of this process (everything runs here, one torch thread, so CPU time is the work done and
is not inflated by other processes on a shared machine; wall time is).

    python benchmarks/bench_checks.py [--fraction 0.05] [--rounds 6] [--steps 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import torch

from swarmrt.config import config_from_dict
from swarmrt.roles.trainer import Trainer
from swarmrt.testing.inprocess import InProcessSwarm


def raw_config(fraction: float, stages: int, hidden: int) -> dict:
    return {
        "run": {"id": "bench-checks", "seed": 0},
        "model": {"factory": "swarmrt.models:mlp", "kwargs": {"features": 64, "hidden": hidden, "depth": 2 * stages},
                  "stages": stages},
        "data": {"kind": "regression", "features": 64, "batch_size": 64, "microbatch_size": 8},
        "optimizer": {"name": "adamw", "lr": 1e-4, "samples_per_step": 64},
        "network": {"verify_fraction": fraction, "verify_tolerance": 0.5, "no_peers_timeout_s": 30.0},
    }


def time_round(swarm: InProcessSwarm, fraction: float, stages: int, hidden: int, steps: int,
               seed: int) -> tuple[float, float, int]:
    """Median wall and CPU seconds per step of one round of ``steps`` steps, and the hops checked."""
    config = config_from_dict(raw_config(fraction, stages, hidden))
    trainer = Trainer(config, dht=None, client=swarm.client, trainer_id=f"b{seed}", rng=random.Random(seed))
    trainer.view_peers(swarm.records)

    async def go() -> tuple[list[float], list[float]]:
        wall, cpu = [], []
        for step in range(steps):
            started, cpu_started = time.perf_counter(), time.process_time()
            await trainer.train_step(step)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
        return wall, cpu

    wall, cpu = asyncio.run(go())
    return statistics.median(wall), statistics.median(cpu), trainer.checks.counts.checked_hops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per setting, alternating")
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    swarm = InProcessSwarm.build(config_from_dict(raw_config(0.0, args.stages, args.hidden)), peers_per_stage=3)
    wall: dict[float, list[float]] = {0.0: [], args.fraction: []}
    cpu: dict[float, list[float]] = {0.0: [], args.fraction: []}
    checked = 0
    try:
        time_round(swarm, 0.0, args.stages, args.hidden, 2, seed=999)  # warm-up
        for r in range(args.rounds):
            for fraction in (0.0, args.fraction):
                seconds, cpu_seconds, n = time_round(swarm, fraction, args.stages, args.hidden, args.steps, seed=r)
                wall[fraction].append(seconds)
                cpu[fraction].append(cpu_seconds)
                checked += n if fraction else 0
    finally:
        swarm.close()
    hops = args.rounds * args.steps * 8 * args.stages
    out = {"fraction": args.fraction, "checked_hops": checked, "hops": hops}
    for name, results in (("wall", wall), ("cpu", cpu)):
        base, with_checks = statistics.median(results[0.0]), statistics.median(results[args.fraction])
        out[name] = {"step_s_without": round(base, 5), "step_s_with": round(with_checks, 5),
                     "ratio": round(with_checks / base, 4)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
