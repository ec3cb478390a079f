"""Pipeline efficiency: achieved samples/s over what the stage speeds allow.

Stages whose forward and backward each take a fixed time (an emulated
``--compute-delay``, a sleep, so the 2 cores do not limit it), 2 peers per stage
of different speeds (one twice as slow), enough trainers to keep them busy.
A peer with delay d serves a microbatch of m samples in 2d seconds (forward +
backward), so stage s can do at most sum_p m / (2 d_p) samples/s and the
pipeline at most the minimum of that over stages. Runs 1, 2 and 4 trainers one after
the other on the same swarm and prints achieved/ideal for each; ``--staleness`` is
``optimizer.staleness`` (0: a barrier at every step; k: up to k + 1 steps in flight).

    python benchmarks/bench_pipeline.py [--delay 0.1] [--steps 30] [--trainers 1,2,4] [--staleness 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from swarmrt.config import config_from_dict
from swarmrt.localswarm.swarm import LocalSwarm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=0.1, help="fast peers' seconds per forward (and per backward)")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--trainers", default="1,2,4", help="trainer counts to run, one after the other")
    parser.add_argument("--staleness", type=int, default=1, help="optimizer.staleness of the trainers")
    parser.add_argument("--microbatch", type=int, default=4)
    parser.add_argument("--microbatches-per-step", type=int, default=8)
    args = parser.parse_args()
    m = args.microbatch
    config = config_from_dict({
        "run": {"id": "bench-pipeline"},
        "model": {"factory": "swarmrt.models:mlp", "kwargs": {"features": 8, "hidden": 8, "depth": 2 * args.stages},
                  "stages": args.stages},
        "data": {"kind": "regression", "features": 8, "batch_size": m * args.microbatches_per_step,
                 "microbatch_size": m},
        "optimizer": {"samples_per_step": 64, "staleness": args.staleness},
        "network": {"forward_timeout_s": 30.0, "backward_timeout_s": 30.0},
    })
    delays = [args.delay, 2 * args.delay]  # per stage: one fast, one half as fast
    ideal = min(sum(m / (2 * d) for d in delays) for _ in range(args.stages))
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(config, peers_per_stage=0, workdir=tmp) as swarm:
        for stage in range(args.stages):
            for d in delays:
                swarm.add_peer(stage, wait=False, extra_args=["--compute-delay", str(d)])
        for role in swarm.peers():
            swarm.wait_ready(role)
        # warm-up: let every peer measure its throughput and announce it
        swarm.train(steps=3)
        results = []
        for n, count in enumerate(int(c) for c in args.trainers.split(",")):
            t0 = time.time()
            trainers = [swarm.start_trainer(args.steps, extra_args=["--stream", str(10 * n + i + 1)])
                        for i in range(count)]
            summaries = [swarm.wait_trainer(t) for t in trainers]
            # steady state: from the moment every trainer has finished its first step to the last step
            records = [swarm.metrics(t) for t in trainers]
            start = max(r[0]["time"] for r in records)
            end = max(r[-1]["time"] for r in records)
            samples = sum(sum(1 for x in r if x["time"] > start) * config.data.batch_size for r in records)
            results.append((count, samples / (end - start), time.time() - t0, summaries))
    print(f"{args.stages} stages x 2 peers (delays {delays[0]:g}/{delays[1]:g} s per fwd and per bwd), "
          f"{args.microbatches_per_step} microbatches of {m} per step, staleness {args.staleness}, "
          f"{args.steps} steps per trainer; ideal {ideal:.1f} samples/s")
    print(f"{'trainers':>8} {'samples/s':>10} {'ratio':>6} {'wall s':>7}  applied/duplicates/hop retries")
    for count, achieved, wall, summaries in results:
        acc = " ".join(f"{s['applied']}/{s['duplicates']}/{s['hop_retries']}" for s in summaries)
        print(f"{count:8d} {achieved:10.1f} {achieved / ideal:6.2f} {wall:7.1f}  {acc}")
    print("target: ratio >= 0.9 with 1 and 2 trainers")


if __name__ == "__main__":
    main()
