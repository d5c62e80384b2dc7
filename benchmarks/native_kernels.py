"""Native CPU kernels next to mx.quantized_matmul (float32) and the machine's read bandwidth.

    python benchmarks/native_kernels.py [--repeats 7] [--pool-mb 320]

Every timed sample evaluates one call on each of several copies of the weights (together
larger than the last-level cache, so weights come from DRAM as in decoding), native and MLX
interleaved sample by sample. Printed: median ms per call, spread (min-max), GB/s of weight
bytes (packed w + scales + biases) and that as a share of the 2-thread read bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from flashmoe import kernels
from flashmoe.kernels import native


def read_bandwidth(gb: float = 1.0, threads: int = 1, repeats: int = 5) -> float:
    """Best GB/s of numpy sums over a `gb` GB float32 array split across `threads` threads."""
    a = np.ones(int(gb * 2**30) // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(repeats):
            t = time.perf_counter()
            list(ex.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def quantized(shape, bits, group_size):
    q, s, b = mx.quantize(mx.random.normal(shape), group_size=group_size, bits=bits)
    s, b = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
    mx.eval(q, s, b)
    return q, s, b


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: [seconds per call, ...]}: each fn returns a list of arrays (one per weight copy)."""
    for fn in fns.values():
        mx.eval(fn())  # warm-up
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            outs = fn()
            mx.eval(outs)
            samples[name].append((time.perf_counter() - t) / len(outs))
    return samples


def row(label, name, secs, nbytes, bw):
    med = statistics.median(secs)
    gbs = nbytes / med / 1e9
    print(
        f"{label:<28} {name:<7} {med * 1e3:8.3f} ms  ({min(secs) * 1e3:.3f}-{max(secs) * 1e3:.3f})"
        f"  {gbs:6.2f} GB/s  {100 * gbs / bw:5.1f}%"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--pool-mb", type=int, default=320, help="weights per shape, spread over copies (> LLC)")
    args = p.parse_args()
    mx.set_default_device(mx.cpu)
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.why_unavailable()}")
    bw1, bw2 = read_bandwidth(threads=1), read_bandwidth(threads=2)
    print(f"native: {native.info()}")
    print(
        f"read bandwidth (numpy sum over 1 GB): 1 thread {bw1:.1f} GB/s, 2 threads {bw2:.1f} GB/s; share below is of {bw2:.1f}"
    )
    print(f"{'shape':<28} {'kernel':<7} {'median':>11}  (min-max)        GB/s  share")

    for out_dim, in_dim in [(4096, 4096), (16384, 4096)]:
        for bits in (4, 8):
            one = quantized((out_dim, in_dim), bits, 64)
            nbytes = sum(a.nbytes for a in one)
            copies = [one] + [
                tuple(mx.array(a) + 0 for a in one) for _ in range(max(1, args.pool_mb * 2**20 // nbytes) - 1)
            ]
            mx.eval(copies)
            x = mx.random.normal((1, in_dim))
            fns = {
                "native": lambda: [
                    native.dequant_matvec(x, q, s, b, bits=bits, group_size=64) for q, s, b in copies
                ],
                "mlx": lambda: [
                    mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=bits)
                    for q, s, b in copies
                ],
            }
            res = interleaved(fns, args.repeats)
            for name, secs in res.items():
                row(f"{out_dim}x{in_dim} {bits}-bit g64", name, secs, nbytes, bw2)
            copies = None  # free the pool before the next shape

    experts, k = 512, 10
    for label, out_dim, in_dim, shared in [
        ("gate/up 10/512 512x2048", 512, 2048, True),
        ("down 10/512 2048x512", 2048, 512, False),
    ]:
        q, s, b = quantized((experts, out_dim, in_dim), 4, 64)
        per_expert = (q.nbytes + s.nbytes + b.nbytes) // experts
        rng = np.random.default_rng(0)
        calls = [mx.array(rng.choice(experts, k, replace=False)[None].astype(np.uint32)) for _ in range(32)]
        x = mx.random.normal((1, in_dim) if shared else (1, k, in_dim))
        fns = {
            "native": lambda: [
                native.gather_dequant_matvec(x, q, s, b, i, bits=4, group_size=64) for i in calls
            ],
            "mlx": lambda: [
                kernels.gather_dequant_matvec(x, q, s, b, i, bits=4, group_size=64, backend="mlx")
                for i in calls
            ],
        }
        for name, secs in interleaved(fns, args.repeats).items():
            row(label, name, secs, k * per_expert, bw2)


if __name__ == "__main__":
    main()
