"""Communication vs quality of local SGD (issue 3), in one process.

K replicas of the default example model (tiny Llama, byte-level text) each train
on their own data stream with AdamW; every H inner steps they average their
pseudo-gradients (the exact mean of what each replica's codec decodes to,
which is what a lossless all-reduce of the compressed payloads delivers) and
apply the outer step (swarmrt.local_sgd.diloco.DiLoCo). Same number of tokens in
every configuration. Bytes = the codec payloads one replica sends per round x
rounds (an all-reduce multiplies every configuration by the same factor, so
the ratios hold). Configurations:

  (a) H=1,  none (fp32), outer SGD lr 1, no momentum = synchronous averaging
  (b) H=10 and H=50, fp16, outer Nesterov lr 0.7 momentum 0.9 (DiLoCo)
  (c) H=50, int8
  (d) H=50, top-k 1% with error feedback

This isolates the algorithm from the network: the processes, hivemind's
all-reduce and its timeouts are exercised by tests/integration/test_local_sgd_swarm.py.

    python benchmarks/bench_local_sgd.py [--steps 300] [--replicas 2]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from swarmrt.wire.codecs import ErrorFeedback, decode, encode
from swarmrt.config import config_from_dict
from swarmrt.local_sgd.config import LocalSGDSection
from swarmrt.local_sgd.diloco import DiLoCo
from swarmrt.data import Batches, loss_sum
from swarmrt.models.build import build_layers

CONFIGS = [
    ("a", "H=1 fp32 sync", 1, "none", 1.0, 0.0),
    ("b", "H=10 fp16", 10, "fp16", 0.7, 0.9),
    ("b", "H=50 fp16", 50, "fp16", 0.7, 0.9),
    ("c", "H=50 int8", 50, "int8", 0.7, 0.9),
    ("d", "H=50 top-k 1% + EF", 50, "topk:0.01", 0.7, 0.9),
]


def run(config, steps: int, replicas: int, H: int, codec: str, outer_lr: float, momentum: float, lr: float):
    models, opts, dilocos, data = [], [], [], []
    for r in range(replicas):
        model = torch.nn.Sequential(*build_layers(config))  # same seed: identical init
        models.append(model)
        opts.append(torch.optim.AdamW(model.parameters(), lr=lr))
        dilocos.append(DiLoCo(list(model.parameters()),
                              LocalSGDSection(inner_steps=H, outer_lr=outer_lr, outer_momentum=momentum,
                                              nesterov=momentum > 0)))
        data.append(Batches(config.data, config.run.seed, stream=r))
    feedback = [ErrorFeedback() for _ in range(replicas)]
    sent = 0
    for step in range(steps):
        for r in range(replicas):
            x, y = data[r].batch(step)
            opts[r].zero_grad()
            (loss_sum(config.data, models[r](x), y) / x.shape[0]).backward()
            opts[r].step()
        if (step + 1) % H:
            continue
        decoded = []
        for r in range(replicas):
            mine = []
            for i, g in enumerate(dilocos[r].pseudo_gradient()):
                enc = feedback[r].compress(str(i), g, codec) if codec.startswith("topk") else encode(g, codec)
                if r == 0:
                    sent += len(enc.data)
                mine.append(decode(enc))
            decoded.append(mine)
        mean = [torch.stack(ts).mean(0) for ts in zip(*decoded)]
        for d in dilocos:
            d.apply(mean)
    x, y = data[0].eval_batch(128)
    with torch.no_grad():
        final = float(loss_sum(config.data, models[0](x), y) / x.shape[0])
    assert len({d.params_hash() for d in dilocos}) == 1, "replicas diverged"
    return sent, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = config_from_dict({"model": {"kwargs": {"hidden_size": 64, "layers": 4}, "stages": 1},
                               "data": {"seq_len": 64, "batch_size": 16, "microbatch_size": 16}})
    results = []
    for tag, name, H, codec, outer_lr, momentum in CONFIGS:
        t0 = time.time()
        sent, final = run(config, args.steps, args.replicas, H, codec, outer_lr, momentum, args.lr)
        results.append((tag, name, sent, final, time.time() - t0))
    base_bytes, base_loss = results[0][2], results[0][3]
    print(f"{args.replicas} replicas x {args.steps} inner steps x {config.data.batch_size} x {config.data.seq_len} "
          f"tokens each; held-out loss of replica 0 (ln 256 = {math.log(256):.3f} untrained)")
    print(f"{'':3} {'configuration':22} {'bytes sent/peer':>16} {'x fewer':>8} {'final loss':>10} {'vs (a)':>8}")
    for tag, name, sent, final, secs in results:
        print(f"({tag}) {name:22} {sent:16,d} {base_bytes / max(sent, 1):8.0f} {final:10.4f} "
              f"{(final / base_loss - 1) * 100:+7.2f}%")


if __name__ == "__main__":
    main()
