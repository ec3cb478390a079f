"""Pipeline efficiency: achieved samples/s over what the stage speeds allow.

Stages whose forward and backward each take a fixed time (an emulated
``--compute-delay``, a sleep, so the 2 cores do not limit it), 2 peers per stage
of different speeds (one twice as slow), enough trainers to keep them busy.
A peer with delay d serves a microbatch of m samples in 2d seconds (forward +
backward), so stage s can do at most sum_p m / (2 d_p) samples/s and the
pipeline at most the minimum of that over stages. Prints achieved/ideal.

    python benchmarks/bench_pipeline.py [--delay 0.1] [--steps 40] [--trainers 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from swarmrt.config import config_from_dict
from swarmrt.localswarm.swarm import LocalSwarm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=0.1, help="fast peers' seconds per forward (and per backward)")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--trainers", type=int, default=4)
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
        "optimizer": {"samples_per_step": 64},
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
        t0 = time.time()
        trainers = [swarm.start_trainer(args.steps, extra_args=["--stream", str(i + 1)]) for i in range(args.trainers)]
        summaries = [swarm.wait_trainer(t) for t in trainers]
        # steady state: from the moment every trainer has finished its first step to the last step
        records = [swarm.metrics(t) for t in trainers]
        start = max(r[0]["time"] for r in records)
        end = max(r[-1]["time"] for r in records)
        samples = sum(sum(1 for x in r if x["time"] > start) * config.data.batch_size for r in records)
        achieved = samples / (end - start)
        wall = time.time() - t0
    print(json.dumps({"summaries": [{k: s[k] for k in ("applied", "hop_retries", "duplicates")} for s in summaries]}))
    print(f"{args.stages} stages x 2 peers (delays {delays[0]:g}/{delays[1]:g} s per fwd and per bwd), "
          f"{args.trainers} trainers x {args.microbatches_per_step} microbatches of {m}")
    print(f"ideal    : {ideal:.1f} samples/s")
    print(f"achieved : {achieved:.1f} samples/s (steady state; {wall:.1f} s wall for the timed run)")
    print(f"ratio    : {achieved / ideal:.2f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
