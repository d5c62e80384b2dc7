"""Where a decode step's time goes: building the graph (Python) against evaluating it, per engine.

    python benchmarks/step_profile.py --model DIR [--tokens 24] [--launches]

For flashmoe and mlx-lm on one checkpoint: per decode token, the median milliseconds spent
building the step's graph in Python (model(...) without evaluation) and evaluating it
(mx.eval, host encoding plus device work), and the primitives in one step's graph by kind
(mx.export_to_dot; a compiled function counts as one node). `--launches` adds the cost of one
launch: N independent calls in one evaluation of a trivial mx.fast custom kernel, a
one-element add, and a small quantized matvec (flashmoe's kernel and mx.quantized_matmul).
A step that is much slower than its bytes need is paid per launch; these numbers say whether
the host (graph building, encoding) or the device is what a launch costs.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from flashmoe import kernels
from flashmoe.analysis.parity import mlx_lm_cache, mlx_lm_model
from flashmoe.loader import load_model

PROMPT = [11, 23, 5, 87, 42, 7, 19, 3]


def step_times(model, make_cache, tokens: int) -> tuple[list[float], list[float], collections.Counter]:
    """(build ms, eval ms) per greedy decode token, and one step's primitives by kind."""
    cache = make_cache()
    logits = model(mx.array([PROMPT]), cache)
    tok = mx.argmax(logits[:, -1], axis=-1)
    mx.eval(tok)
    builds, evals, kinds = [], [], collections.Counter()
    for i in range(tokens + 3):
        t0 = time.perf_counter()
        logits = model(tok[:, None], cache)
        nxt = mx.argmax(logits[:, -1], axis=-1)
        t1 = time.perf_counter()
        if i == 2:
            with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
                mx.export_to_dot(f.name, nxt)
                kinds = collections.Counter(re.findall(r'label ="([^"]+)"', f.read()))
        t2 = time.perf_counter()
        mx.eval(nxt)
        t3 = time.perf_counter()
        tok = nxt
        if i >= 3:  # the first steps compile and allocate
            builds.append((t1 - t0) * 1e3)
            evals.append((t3 - t2) * 1e3)
    return builds, evals, kinds


def profile_model(directory: str, tokens: int) -> None:
    engines = {
        "flashmoe": (m := load_model(directory), m.make_cache),
        "mlx-lm": (r := mlx_lm_model(Path(directory), dtype=None), mlx_lm_cache(r)),
    }
    for name, (model, make_cache) in engines.items():
        builds, evals, kinds = step_times(model, make_cache, tokens)
        b, e = statistics.median(builds), statistics.median(evals)
        print(
            f"{name:<9} build {b:6.3f} ms  eval {e:6.3f} ms  step {b + e:6.3f} ms "
            f"({1e3 / (b + e):6.1f} tok/s)  nodes {sum(kinds.values())}"
        )
        print("          " + ", ".join(f"{k} {n}" for k, n in kinds.most_common(14)))


TRIVIAL = "if (threadIdx.x == 0) { out[0] = inp[0] + 1.0f; }"


def launch_costs(calls: int) -> None:
    """Microseconds per call for `calls` independent calls evaluated together (build | eval)."""
    one = mx.ones((1,), dtype=mx.float32)
    trivial = mx.fast.cuda_kernel(
        name="fm_trivial", input_names=["inp"], output_names=["out"], source=TRIVIAL
    )
    q, s, b = mx.quantize(mx.random.normal((512, 512)), group_size=64, bits=4)
    s, b = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
    xs = [mx.random.normal((1, 512)).astype(mx.bfloat16) + i for i in range(calls)]
    mx.eval(q, s, b, xs)
    cases = {
        "custom kernel, 32 threads": lambda i: trivial(
            inputs=[one],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
        )[0],
        "add, one element": lambda i: one + float(i),
        "quantized_matmul 512x512 4-bit": lambda i: mx.quantized_matmul(
            xs[i], q, s, b, group_size=64, bits=4
        ),
        "flashmoe matvec 512x512 4-bit": lambda i: kernels.dequant_matvec(
            xs[i], q, s, b, bits=4, group_size=64
        ),
    }
    for label, fn in cases.items():
        rows = []
        for rep in range(5):
            t0 = time.perf_counter()
            outs = [fn(i) for i in range(calls)]
            t1 = time.perf_counter()
            mx.eval(outs)
            t2 = time.perf_counter()
            if rep:
                rows.append(((t1 - t0) * 1e6 / calls, (t2 - t1) * 1e6 / calls))
        build = statistics.median(r[0] for r in rows)
        ev = statistics.median(r[1] for r in rows)
        print(f"{label:<34} build {build:7.2f} us/call  eval {ev:7.2f} us/call  ({calls} calls per eval)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="checkpoint directory (repeatable)")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--launches", action="store_true")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    print(f"device {mx.default_device()}, flashmoe backend {kernels.resolve_backend('auto')}")
    if args.launches:
        launch_costs(args.calls)
    for directory in args.model:
        print(f"\n{directory}")
        profile_model(directory, args.tokens)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
