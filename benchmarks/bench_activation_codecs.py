"""Activation compression chosen by measurement: loss and bytes per codec, side by side in one run.

For each model (the demo's tiny Llama, and a larger one) and each codec (none, fp16,
bf16, int8_blockwise) applied in both directions (``compression.activations`` for
forward activations, ``compression.gradients`` for their gradients), train the same
seeded model on the same samples for ``--steps`` steps through the real stage
handlers and the data plane's framing in this process
(``swarmrt.testing.inprocess``: one peer per stage, no sockets, so only the codec
differs), then evaluate on the same held-out batches. Prints the bytes the trainer's
link carried (headers and payloads, both ways) and the held-out loss, each relative
to ``none``. With several ``--seeds`` (model init and data), each row is the mean over
them, and the relative losses are the mean of the per-seed ratios.

    python benchmarks/bench_activation_codecs.py [--steps 150] [--models demo,large] [--eval-batches 4] [--seeds 0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from swarmrt.config import load_config, with_overrides
from swarmrt.localswarm.demo import default_config_path
from swarmrt.roles.trainer import Trainer
from swarmrt.testing.inprocess import InProcessSwarm

CODECS = ("none", "fp16", "bf16", "int8_blockwise")
MODELS = {
    "demo": {},  # swarmrt/examples/tiny_llama.toml: hidden 64, 4 layers, 3 stages
    "large": {"kwargs": {"vocab_size": 256, "hidden_size": 256, "layers": 6, "heads": 8}},
}


class CountingClient:
    """The in-process client, counting what crosses the trainer's link (headers and payloads)."""

    def __init__(self, inner):
        self.inner, self.sent, self.received = inner, 0, 0

    async def forward(self, address, request, timeout):
        response = await self.inner.forward(address, request, timeout)
        self.sent, self.received = self.sent + request.nbytes, self.received + response.nbytes
        return response

    async def backward(self, address, request, timeout):
        response = await self.inner.backward(address, request, timeout)
        self.sent, self.received = self.sent + request.nbytes, self.received + response.nbytes
        return response

    async def close(self):
        await self.inner.close()


def run(model: str, codec: str, steps: int, eval_batches: int, seed: int) -> dict:
    base = load_config(default_config_path())
    config = with_overrides(base, run={"seed": seed}, model=MODELS[model],
                            compression={"activations": codec, "gradients": codec})
    swarm = InProcessSwarm.build(config, peers_per_stage=1)
    client = CountingClient(swarm.client)
    trainer = Trainer(config, dht=None, client=client, trainer_id="bench")
    trainer.view_peers(swarm.records)
    started = time.perf_counter()
    try:
        summary = asyncio.run(trainer.run(steps))
        train_bytes = client.sent + client.received
        evaluation = asyncio.run(trainer.evaluate(batches=eval_batches))
    finally:
        swarm.close()
    return {"model": model, "codec": codec, "bytes": train_bytes, "final_train_loss": summary["final_loss"],
            "eval_loss": evaluation["loss"], "seconds": time.perf_counter() - started,
            "duplicates": summary["duplicates"], "applied": summary["applied"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--models", default="demo,large")
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds; rows are means over them")
    args = parser.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    print(f"{args.steps} steps of 16 samples, 3 stages, one peer each; held-out loss on {args.eval_batches} batches; "
          f"seeds {args.seeds}")
    print(f"{'model':6} {'codec':15} {'MB on the link':>14} {'x fewer':>8} {'eval loss':>10} {'vs none':>8} "
          f"{'train loss':>10} {'wall s':>7}")
    for model in args.models.split(","):
        refs = None
        for codec in args.codecs.split(","):
            rs = [run(model, codec, args.steps, args.eval_batches, seed) for seed in seeds]
            for r in rs:
                assert r["duplicates"] == 0 and r["applied"] == args.steps * 4, r
            refs = refs or rs
            mean = {k: statistics.mean(r[k] for r in rs) for k in ("bytes", "eval_loss", "final_train_loss", "seconds")}
            rel = statistics.mean(r["eval_loss"] / ref["eval_loss"] - 1 for r, ref in zip(rs, refs))
            print(f"{model:6} {codec:15} {mean['bytes'] / 1e6:14.2f} {refs[0]['bytes'] / rs[0]['bytes']:8.2f} "
                  f"{mean['eval_loss']:10.4f} {100 * rel:+7.2f}% {mean['final_train_loss']:10.4f} "
                  f"{mean['seconds']:7.1f}", flush=True)


if __name__ == "__main__":
    main()
