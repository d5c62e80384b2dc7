"""Which launch shape makes each GPU matvec fastest: a sweep next to MLX's own kernels, in one run.

    python benchmarks/matvec_sweep.py [--quick] [--json FILE] [--table FILE] [--mode device] [--shapes 4096x4096,...]

For the matrix shapes a decode step of the benchmark checkpoints runs (Qwen3-30B-A3B and
Qwen3-Coder-Next widths: q/k/v, o_proj, routers, shared expert, lm_head; plus kernels.py's
4096x4096 and 16384x4096), every launch shape in the grid below (x staged in shared memory or
read from cache, SIMD groups per threadgroup, rows per row group, loads in flight), each timed
as kernels.py times it in `--mode` (standalone: the median of `repeats` evaluations of `calls`
independent calls; chain: dependent compiled calls over weights beyond the L2; device: that chain's
GPU kernel time, which is what ranks shapes, free of host cost), against mx.quantized_matmul on the
same weights; then
the fused MoE kernels of one token (gate+up, down) against mx.gather_qmm at both MoE widths.
Prints us per call, GB/s of weight bytes, and the ratio to MLX per shape: the default plan's
and the best in the grid. Finally, where it can, each compiled kernel's registers and spill
bytes (CUDA driver attributes of MLX's cached cubins). `--table FILE` writes the best shape of
each as the launch table flashmoe.kernels.gpu.plan reads (FLASHMOE_LAUNCH_TABLE, or
flashmoe/kernels/launch_table.json), under this GPU's name; the sweep itself runs with no table,
so "default" is plan()'s rules.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import mlx.core as mx

import kernels as kernel_bench  # benchmarks/kernels.py, beside this script
from flashmoe.analysis.bench import median_seconds
from flashmoe.kernels import gpu, moe

DENSE = [  # (out, in, bits, what)
    (4096, 4096, 4, "kernels.py"),
    (4096, 4096, 8, "kernels.py"),
    (16384, 4096, 4, "kernels.py"),
    (16384, 4096, 8, "kernels.py"),
    (5120, 2048, 4, "q30 q/k/v"),
    (2048, 4096, 4, "q30 o_proj"),
    (128, 2048, 8, "q30 router"),
    (151936, 2048, 4, "lm_head"),
    (12288, 2048, 4, "cn linear-attn in_proj"),
    (2048, 4096, 8, "8-bit 2048x4096"),
    (512, 2048, 8, "cn router"),
    (1024, 2048, 4, "cn shared gate+up"),
    (2048, 512, 4, "cn shared down"),
]
GRID = gpu.LAUNCH_GRID
MOE = [  # (experts, K, D, I, what)
    (128, 8, 2048, 768, "q30 experts"),
    (512, 10, 2048, 512, "cn experts"),
]
MOE_GRID = gpu.MOE_GRID
GS = kernel_bench.GROUP_SIZE  # the weights come from kernels.quantized_weights
MARGIN = 0.03  # a shape must beat the default by this much to enter the table


def timed(fn, calls: int, repeats: int) -> float:
    return median_seconds(lambda: [fn() for _ in range(calls)], repeats=repeats, warmup=1) / calls


def better(times: dict) -> str:
    """The fastest shape, unless it beats plan()'s default ("{}") by less than MARGIN: noise."""
    best = min(times, key=times.get)
    return best if times[best] < times["{}"] * (1 - MARGIN) else "{}"


def with_override(shape: dict, fn):
    gpu._override.clear()
    gpu._override.update(shape)
    try:
        return fn()
    finally:
        gpu._override.clear()


def shape_timer(mode: str, out_dim: int, in_dim: int, bits: int, calls: int, repeats: int):
    """(weight bytes, timer): timer(fn) is seconds per call of fn(x, (w, scales, biases)) on a random
    matrix of this shape, measured as kernels.py --mode `mode` measures it."""
    x = mx.random.normal((1, in_dim)).astype(mx.bfloat16)
    weights = kernel_bench.quantized_weights(out_dim, in_dim, bits)
    mx.eval(x, weights)
    nbytes = sum(a.nbytes for a in weights)
    sets = None
    if mode in ("chain", "device"):
        sets = kernel_bench.weight_copies(
            nbytes, lambda: kernel_bench.quantized_weights(out_dim, in_dim, bits)
        )
    return nbytes, lambda fn: kernel_bench.measure(
        mode, lambda x, w=weights: fn(x, w), x, sets, calls, repeats
    )


def dense(calls: int, repeats: int, quick: bool, rows: list[dict], save, mode: str, only=None) -> list[dict]:
    """The dense shapes (`quick`: the first four rows of DENSE, kernels.py's; `only`: these OUTxIN)."""
    print(
        f"{'shape':>12} {'bits':>4} {'what':<22} {'qmm us':>8} {'default':>8} {'best':>8} "
        f"{'best shape':<22} {'GB/s':>7} {'x qmm':>6}"
    )
    for out_dim, in_dim, bits, what in DENSE[:4] if quick else DENSE:
        if only and f"{out_dim}x{in_dim}" not in only:
            continue
        nbytes, timer = shape_timer(mode, out_dim, in_dim, bits, calls, repeats)
        qmm = timer(lambda x, w: mx.quantized_matmul(x, *w, group_size=GS, bits=bits))
        times = {}
        for shape in [{}] + GRID:
            call = lambda x, w: gpu.matvec("cuda", x, *w, bits=bits, group_size=GS)  # noqa: E731
            times[json.dumps(shape)] = with_override(shape, lambda: timer(call))
        best = better(times)
        default = times["{}"]
        row = dict(
            shape=f"{out_dim}x{in_dim}",
            bits=bits,
            what=what,
            qmm_us=qmm * 1e6,
            default_us=default * 1e6,
            best_us=times[best] * 1e6,
            best=best,
            all_us={k: v * 1e6 for k, v in times.items()},
            bytes=nbytes,
        )
        rows.append(row)
        save()
        print(
            f"{row['shape']:>12} {bits:4d} {what:<22} {qmm * 1e6:8.2f} {default * 1e6:8.2f} "
            f"{times[best] * 1e6:8.2f} {best:<22} {nbytes / times[best] / 1e9:7.0f} {qmm / times[best]:6.2f}"
        )
        sys.stdout.flush()
    return rows


def fused_moe(calls: int, repeats: int, rows: list[dict], save) -> list[dict]:
    print(f"\n{'MoE':<14} {'kernel':<8} {'default':>8} {'best':>8} {'best shape':<20}   gather_qmm, all 3")
    for experts, k, d, inter, what in MOE:
        stacks = [
            mx.quantize(mx.random.normal((experts, o, i)).astype(mx.bfloat16), group_size=GS, bits=4)
            for o, i in ((inter, d), (inter, d), (d, inter))
        ]
        x = mx.random.normal((1, d)).astype(mx.bfloat16)
        ids = mx.array(list(range(0, experts, experts // k))[:k], dtype=mx.uint32)[None]
        rw = mx.softmax(mx.random.normal((1, k)), axis=-1).astype(mx.bfloat16)
        h = mx.random.normal((1, k, inter)).astype(mx.bfloat16)
        mx.eval(stacks, x, ids, rw, h)
        gate, up, down = stacks

        def theirs():
            xe = x[:, None, None, :]
            g = mx.gather_qmm(xe, *gate, rhs_indices=ids, transpose=True, group_size=GS, bits=4)
            u = mx.gather_qmm(xe, *up, rhs_indices=ids, transpose=True, group_size=GS, bits=4)
            hh = g * mx.sigmoid(g) * u
            y = mx.gather_qmm(hh, *down, rhs_indices=ids, transpose=True, group_size=GS, bits=4)
            return (y.squeeze(-2) * rw[..., None]).sum(axis=-2)

        def gate_up():
            return moe.moe_gate_up(x, gate, up, ids, bits=4, group_size=GS, backend="cuda")

        def down_sum():
            return moe.moe_down(h, down, ids, rw, bits=4, group_size=GS, backend="cuda")

        base = timed(theirs, calls, repeats)
        for kind, out_dim, in_dim, fn in (("gate_up", inter, d, gate_up), ("down", d, inter, down_sum)):
            times = {
                json.dumps(shape): with_override(shape, lambda: timed(fn, calls, repeats))
                for shape in [{}] + MOE_GRID
            }
            best = better(times)
            rows.append(
                dict(
                    kind=kind,
                    out=out_dim,
                    inp=in_dim,
                    bits=4,
                    what=what,
                    gather_qmm_us=base * 1e6,
                    best=best,
                    all_us={key: v * 1e6 for key, v in times.items()},
                )
            )
            save()
            print(
                f"{what:<14} {kind:<8} {times['{}'] * 1e6:8.2f} {times[best] * 1e6:8.2f} {best:<20}   "
                f"{base * 1e6:.2f}"
            )
        sys.stdout.flush()
    return rows


def write_table(path: str, dense_rows: list[dict], moe_rows: list[dict]) -> None:
    """The best measured shape per (kind, shape, bits), under this GPU's name, merged into `path`."""
    entries = {}
    for row in dense_rows:
        out_dim, in_dim = map(int, row["shape"].split("x"))
        entries[gpu.table_key("matvec", out_dim, in_dim, row["bits"])] = json.loads(row["best"])
    for row in moe_rows:
        entries[gpu.table_key(row["kind"], row["out"], row["inp"], row["bits"])] = json.loads(row["best"])
    table = json.loads(open(path).read()) if os.path.exists(path) else {}
    table.setdefault(gpu.device_name(), {}).update(entries)
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)


def register_report() -> None:
    """Registers and local-memory (spill) bytes of flashmoe's compiled kernels, from MLX's cubin cache."""
    import ctypes
    import glob
    import os

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        ctx = ctypes.c_void_p()
        cuda.cuInit(0)
        cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0)
        cuda.cuCtxPushCurrent(ctx)
    except OSError as exc:
        print(f"no register report: {exc}")
        return
    print(f"\n{'regs':>5} {'local B':>7} {'shared B':>8}  kernel")
    for path in sorted(glob.glob("/tmp/mlx/*/ptx/*flashmoe*.ptx")):
        names = open(path[:-4] + ".txt").read().splitlines() if os.path.exists(path[:-4] + ".txt") else []
        module = ctypes.c_void_p()
        if cuda.cuModuleLoad(ctypes.byref(module), path.encode()) != 0:
            continue
        for line in names:
            name, mangled = line.split("\t")
            fn = ctypes.c_void_p()
            if cuda.cuModuleGetFunction(ctypes.byref(fn), module, mangled.encode()) != 0:
                continue
            vals = []
            for attr in (4, 3, 1):  # NUM_REGS, LOCAL_SIZE_BYTES, SHARED_SIZE_BYTES
                v = ctypes.c_int()
                cuda.cuFuncGetAttribute(ctypes.byref(v), attr, fn)
                vals.append(v.value)
            print(f"{vals[0]:5d} {vals[1]:7d} {vals[2]:8d}  {name[:110]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--no-moe", action="store_true")
    p.add_argument("--table", help="write the best shapes as a launch table here")
    p.add_argument(
        "--mode",
        choices=kernel_bench.MODES,
        default="standalone",
        help="how dense shapes are timed (kernels.py --mode): device ranks them by GPU kernel time alone",
    )
    p.add_argument("--shapes", help="comma-separated OUTxIN dense shapes to sweep (default: all)")
    args = p.parse_args()
    os.environ["FLASHMOE_LAUNCH_TABLE"] = os.devnull  # plan()'s own rules are the default measured
    gpu.launch_table.cache_clear()
    print(f"mlx {mx.__version__} {mx.default_device()}, bf16, group size {GS}")
    rows, moe_rows = [], []

    def save():  # after every row, so a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(dense=rows, moe=moe_rows), f, indent=1)
        if args.table:
            write_table(args.table, rows, moe_rows)

    only = set(args.shapes.split(",")) if args.shapes else None
    dense(args.calls, args.repeats, args.quick, rows, save, args.mode, only)
    if not args.no_moe:
        fused_moe(args.calls, args.repeats, moe_rows, save)
    register_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
