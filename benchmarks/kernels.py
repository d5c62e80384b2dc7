"""Dequant-matvec speed: every available backend next to mx.quantized_matmul, in one run.

    python benchmarks/kernels.py [--full] [--backends cuda,mlx] [--calls N] [--repeats N] [--mode chain] [--json out.json]

By default a quick look: one dense shape (4096x4096) and one expert shape (10x512x2048), at 4 bits,
5 calls x 3 repeats: about 30 s here. `--full` is the whole sweep below (both dense shapes, both
expert shapes, 4 and 8 bits, 50 calls x 7 repeats): over 6.5 minutes here. ("Here": a 2-core x86
CPU, backends native, mlx and reference, where MLX's gather_qmm and the pure-MLX reference take
~0.1 s a call; a GPU runs either in seconds.)

For each (out, in) shape and bits, and for 10 of 512 stacked experts at Qwen3-Coder-Next's
expert shapes (gate/up 512x2048 with one shared x, down 2048x512 with one x per expert,
against mx.gather_qmm): the median time of one matvec (1 x in activations,
many calls per evaluation so per-call sync overhead does not dominate), the achieved
GB/s of weight bytes (packed weights + scales + biases), that figure as a share of this
machine's measured memory bandwidth, and the time relative to mx.quantized_matmul.
"""

from __future__ import annotations

import argparse
import json
import math

import mlx.core as mx

from flashmoe import compute_dtype, kernels
from flashmoe.analysis.bench import measure_bandwidth, median_seconds

SHAPES = [(4096, 4096), (16384, 4096)]  # (out, in)
GATHERED = [(512, 2048), (2048, 512)]  # (out, in) of 10 of 512 experts: Coder-Next gate/up and down
BITS = (4, 8)
QUICK = dict(shapes=SHAPES[:1], gathered=GATHERED[:1], bits=(4,), calls=5, repeats=3)
FULL = dict(shapes=SHAPES, gathered=GATHERED, bits=BITS, calls=50, repeats=7)
EXPERTS, TOP_K = 512, 10
GROUP_SIZE = 64
MODES = ("standalone", "compiled", "chain", "device")
CHAIN_BYTES = 256 * 2**20  # --chain: weight sets cycled through, together over the H200's 50 MB L2


def device_seconds(fn, x, weight_sets: list, calls: int) -> float:
    """GPU time per call of fn (NVIDIA only): the kernels' summed durations under CUPTI tracing
    (PyTorch's profiler, as kernel_timeline.py uses it) over one dependent chain of `calls` calls
    (as `chained` builds it, so no two kernels overlap), copies left out: host cost (Python, graph
    building, launch latency) is not counted, on every backend alike."""
    from kernel_timeline import import_torch, kernel_events

    profile, activity = import_torch()
    run = mx.compile(chain_of(fn, x, weight_sets, calls))
    mx.eval(run(x))  # warm: compiled, allocated
    with profile(activities=[activity.CUDA]) as prof:
        mx.eval(run(x))
        mx.synchronize()
    kernels_run = [
        e for e in kernel_events(prof) if e.get("cat") == "kernel" and "copy" not in e["name"].lower()
    ]
    return sum(e["dur"] for e in kernels_run) * 1e-6 / calls


def timed(fn, x, calls: int, repeats: int, compiled: bool = False) -> float:
    """Median seconds per call of fn(x): `calls` calls per evaluation (one sync for many, as in a
    decode step). compiled: the calls inside one mx.compile'd function, each on its own copy of x
    (so none is merged with another), as a compiled decode step runs them: Python and graph
    building then cost once per evaluation, on every backend alike."""
    if not compiled:
        return median_seconds(lambda: [fn(x) for _ in range(calls)], repeats=repeats, warmup=1) / calls
    xs = [x + 0.001 * i for i in range(calls)]
    mx.eval(xs)
    run = mx.compile(lambda *xs: [fn(xi) for xi in xs])
    return median_seconds(lambda: run(*xs), repeats=repeats, warmup=1) / calls


def chain_of(fn, x, weight_sets: list, calls: int):
    """x -> the result of `calls` dependent calls: call i reads weight set i % len(weight_sets)
    and takes the first values of the previous call's output as its x (a contiguous prefix: no
    copy; an output shorter than x is repeated, one concatenation per call on every backend
    alike). fn(x, weights) -> y."""
    shape, size = x.shape, x.size

    def chain(x):
        for i in range(calls):
            y = fn(x, weight_sets[i % len(weight_sets)]).reshape(-1)
            if y.size < size:
                y = mx.concatenate([y] * math.ceil(size / y.size))
            x = y[:size].reshape(shape)
        return x

    return chain


def chained(fn, x, weight_sets: list, calls: int, repeats: int) -> float:
    """Median seconds per call of chain_of(...) inside one mx.compile'd function, as a decode step
    runs its matvecs (weight sets together larger than a GPU's L2 cache, so weights come from memory)."""
    run = mx.compile(chain_of(fn, x, weight_sets, calls))
    return median_seconds(lambda: run(x), repeats=repeats, warmup=1) / calls


def weight_copies(nbytes: int, make) -> list:
    """Distinct weight sets, `make()` each, enough to exceed CHAIN_BYTES together (at least 2)."""
    sets = [make() for _ in range(max(2, math.ceil(CHAIN_BYTES / nbytes)))]
    mx.eval(sets)
    return sets


def measure(mode: str, call, x, sets, calls: int, repeats: int) -> float:
    """Seconds per call of call(x) in one of MODES."""
    if mode == "device":
        return device_seconds(call, x, sets, calls)
    if mode == "chain":
        return chained(call, x, sets, calls, repeats)
    return timed(call, x, calls, repeats, compiled=mode == "compiled")


def quantized_weights(out_dim: int, in_dim: int, bits: int) -> tuple:
    """A random bf16 (out, in) matrix quantized at GROUP_SIZE: (w, scales, biases). Entries ~ N(0, 1 / in),
    so a chain of calls keeps x's scale."""
    w = (mx.random.normal((out_dim, in_dim)) / math.sqrt(in_dim)).astype(mx.bfloat16)
    return mx.quantize(w, group_size=GROUP_SIZE, bits=bits)


def bench_shape(out_dim, in_dim, bits, backends, calls, repeats, mode="standalone") -> list[dict]:
    """One row per backend for one matrix shape and bit width."""

    def make():
        return quantized_weights(out_dim, in_dim, bits)

    q, scales, biases = make()
    x = mx.random.normal((1, in_dim)).astype(compute_dtype(mx.bfloat16))
    mx.eval(q, scales, biases, x)  # made now: a compiled timing would otherwise remake them every call
    weight_bytes = q.nbytes + scales.nbytes + biases.nbytes
    sets = weight_copies(weight_bytes, make) if mode in ("chain", "device") else None
    rows = []
    for backend in backends:

        def call(x, weights=(q, scales, biases), backend=backend):
            return kernels.dequant_matvec(x, *weights, bits=bits, group_size=GROUP_SIZE, backend=backend)

        seconds = measure(mode, call, x, sets, calls, repeats)
        rows.append(
            dict(
                shape=f"{out_dim}x{in_dim}",
                bits=bits,
                backend=backend,
                us=seconds * 1e6,
                gbps=weight_bytes / seconds / 1e9,
            )
        )
    return rows


def bench_gathered(out_dim, in_dim, bits, backends, calls, repeats, mode="standalone") -> list[dict]:
    """10 of 512 experts (x shared for in 2048, one x per expert for the down shape), as gather_qmm runs them."""

    w = (mx.random.normal((EXPERTS, out_dim, in_dim)) / math.sqrt(in_dim)).astype(mx.bfloat16)

    def fresh_ids():
        return mx.random.permutation(EXPERTS)[:TOP_K].astype(mx.uint32)[None]  # (1, K)

    q, scales, biases = mx.quantize(w, group_size=GROUP_SIZE, bits=bits)
    ids = fresh_ids()
    x = mx.random.normal((1, in_dim) if out_dim < in_dim else (1, TOP_K, in_dim)).astype(mx.bfloat16)
    mx.eval(q, scales, biases, ids, x)
    per = (q.nbytes + scales.nbytes + biases.nbytes) / EXPERTS * TOP_K
    # a chain's calls: the one stack (over the L2 by far), each call its own K experts of it
    sets = [(q, scales, biases, fresh_ids()) for _ in range(calls)] if mode in ("chain", "device") else None
    rows = []
    for backend in backends:

        def call(x, weights=(q, scales, biases, ids), backend=backend):
            return kernels.gather_dequant_matvec(
                x, *weights, bits=bits, group_size=GROUP_SIZE, backend=backend
            )

        seconds = measure(mode, call, x, sets, calls, repeats)
        rows.append(
            dict(
                shape=f"{TOP_K}x{out_dim}x{in_dim}",
                bits=bits,
                backend=backend,
                us=seconds * 1e6,
                gbps=per / seconds / 1e9,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="the whole sweep (every shape, 50 calls x 7 repeats) instead of the quick look",
    )
    parser.add_argument("--backends", default=",".join(kernels.available_backends()), help="comma-separated")
    parser.add_argument(
        "--calls", type=int, default=None, help="matvecs per evaluation (default: 5, --full 50)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed evaluations (default: 3, --full 7)")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="standalone",
        help="standalone: independent calls from Python; compiled: the same inside mx.compile; chain: "
        "dependent calls inside mx.compile over weights larger than a GPU's L2 (as a decode step "
        "runs them); device: the chain's GPU kernel time alone (CUPTI, NVIDIA only)",
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    plan = FULL if args.full else QUICK
    args.calls = args.calls or plan["calls"]
    args.repeats = args.repeats or plan["repeats"]
    backends = args.backends.split(",")
    if "mlx" not in backends:
        backends.append("mlx")  # the baseline: mx.quantized_matmul

    bandwidth = measure_bandwidth(repeats=args.repeats)
    print(
        f"device {mx.default_device()}, activations {compute_dtype(mx.bfloat16)}, bf16 scales/biases, "
        f"g{GROUP_SIZE}; measured memory bandwidth {bandwidth:.1f} GB/s (flashmoe.analysis.bench.measure_bandwidth); "
        f"{args.calls} calls per evaluation, mode {args.mode}"
    )
    print(
        f"{'shape':>14} {'bits':>4} {'backend':>20} {'median us':>10} {'GB/s':>8} {'% of bw':>8} {'vs qmm':>7}"
    )
    rows = []
    cases = [(bench_shape, s) for s in plan["shapes"]] + [(bench_gathered, s) for s in plan["gathered"]]
    for bench, (out_dim, in_dim) in cases:
        for bits in plan["bits"]:
            group = bench(out_dim, in_dim, bits, backends, args.calls, args.repeats, args.mode)
            base = next(r for r in group if r["backend"] == "mlx")["us"]
            for r in group:
                r["share_of_bandwidth"] = r["gbps"] / bandwidth
                r["speedup_vs_quantized_matmul"] = base / r["us"]
                name = (
                    r["backend"]
                    if r["backend"] != "mlx"
                    else ("mlx (quantized_matmul)" if bench is bench_shape else "mlx (gather_qmm)")
                )
                print(
                    f"{r['shape']:>14} {bits:>4} {name:>20} {r['us']:>10.1f} {r['gbps']:>8.1f} "
                    f"{100 * r['share_of_bandwidth']:>7.1f}% {r['speedup_vs_quantized_matmul']:>6.2f}x"
                )
            rows += group
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(device=str(mx.default_device()), bandwidth_gbps=bandwidth, mode=args.mode, rows=rows),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
