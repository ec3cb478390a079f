"""Codec throughput and error on one large float32 tensor (default 64 MiB, N(0, 1), seed 0).

    PYTHONPATH=. python benchmarks/bench_codecs.py [--mib 64] [--repeats 3] [--codecs none,fp16,...]

Prints, per codec: payload size and ratio to the raw tensor, median encode and
decode seconds over the repeats, encode+decode throughput in MB/s of raw tensor,
and the relative L2 error of the round trip.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from swarmrt.wire.codecs import CODEC_NAMES, decode, encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=64.0, help="tensor size in MiB of float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codecs", default=",".join(CODEC_NAMES))
    args = parser.parse_args()

    numel = int(args.mib * 2**20 / 4)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    raw = x.numel() * x.element_size()
    print(f"tensor: {numel} float32 ({raw / 2**20:.0f} MiB), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'codec':<16}{'bytes':>12}{'ratio':>8}{'encode s':>10}{'decode s':>10}{'MB/s':>8}{'rel err':>10}")
    for name in args.codecs.split(","):
        enc_times, dec_times = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            encoded = encode(x, name)
            t1 = time.perf_counter()
            y = decode(encoded)
            t2 = time.perf_counter()
            enc_times.append(t1 - t0)
            dec_times.append(t2 - t1)
        enc, dec = statistics.median(enc_times), statistics.median(dec_times)
        err = float((y.double() - x.double()).norm() / x.double().norm())
        print(
            f"{name:<16}{encoded.nbytes:>12}{encoded.nbytes / raw:>8.3f}{enc:>10.3f}{dec:>10.3f}"
            f"{raw / 1e6 / (enc + dec):>8.0f}{err:>10.2e}"
        )


if __name__ == "__main__":
    main()
