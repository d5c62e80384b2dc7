"""The qwen3_next-g128 NaN on a GPU, stage by stage, each stage in its own process with a time limit
(one that hangs cannot hide the others):

    python benchmarks/gpu_nan_stages.py [--stage NAME]

  qmm    MLX's quantized_matmul on this device against the CPU for every quantized matrix of the
         tiny qwen3_next g128 checkpoint, 1 and 18 rows, float32 and bf16 (repeated 5 times: a race shows
         as a varying result)
  gdn    mx.fast.gated_delta_update on this device against the CPU at that checkpoint's shapes
         (T = 1 and 9, initial state None and zeros, float32 and bf16), 5 times each
  model  flashmoe's float32 logits (backend mlx) and mlx-lm's, finite or not, 5 times
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashmoe import quant  # noqa: E402
from tests.helpers import write_checkpoint  # noqa: E402

STAGES = ("qmm", "gdn", "model")


def finite(a) -> bool:
    return bool(mx.all(mx.isfinite(a.astype(mx.float32))).item())


def err(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return float((mx.abs(a - b).max() / (mx.abs(b).max() + 1e-30)).item())


def stage_qmm(directory: Path) -> None:
    plan = quant.resolve(json.loads((directory / "config.json").read_text()))
    weights = {}
    for f in sorted(directory.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    for prefix in sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales")):
        spec, w = plan.spec_for(prefix), weights[prefix + ".weight"]
        if spec is None or w.ndim != 2:
            continue
        kw = dict(group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
        packed = (w, weights[prefix + ".scales"], weights.get(prefix + ".biases"))
        for rows in (1, 18):
            for dtype in (mx.float32, mx.bfloat16):
                x = mx.random.normal((rows, w.shape[1] * 32 // spec.bits)).astype(dtype)
                cpu = mx.quantized_matmul(x, *packed, **kw, stream=mx.cpu)
                errs = [err(mx.quantized_matmul(x, *packed, **kw), cpu) for _ in range(5)]
                bad = max(errs) > 1e-2 or any(e != e for e in errs)
                print(
                    f"{'BAD ' if bad else ''}{prefix} {tuple(w.shape)} {spec} rows {rows} {dtype}: "
                    f"max err {max(errs):.3g}",
                    flush=True,
                )


def stage_gdn() -> None:
    B, Hk, Hv, dk, dv = 2, 2, 4, 32, 32
    for T in (1, 9):
        for dtype in (mx.float32, mx.bfloat16):
            for with_state in (False, True):
                q = mx.random.normal((B, T, Hk, dk)).astype(dtype) * 0.1
                k = mx.random.normal((B, T, Hk, dk)).astype(dtype) * 0.1
                v = mx.random.normal((B, T, Hv, dv)).astype(dtype)
                g = mx.random.uniform(0.5, 1.0, (B, T, Hv)).astype(dtype)
                beta = mx.random.uniform(0, 1, (B, T, Hv)).astype(dtype)
                state = mx.zeros((B, Hv, dv, dk), dtype=mx.float32) if with_state else None
                y_cpu, s_cpu = mx.fast.gated_delta_update(q, k, v, g, beta, state, stream=mx.cpu)
                results = []
                for _ in range(5):
                    y, s = mx.fast.gated_delta_update(q, k, v, g, beta, state)
                    results.append((finite(y) and finite(s), err(y, y_cpu), err(s, s_cpu)))
                print(
                    f"T {T} {dtype} state {'zeros' if with_state else 'None'}: "
                    + "; ".join(f"finite {f} y {a:.3g} s {b:.3g}" for f, a, b in results),
                    flush=True,
                )


def stage_model(directory: Path) -> None:
    from flashmoe.analysis.parity import mlx_lm_model
    from flashmoe.loader import load_model

    ours = load_model(directory, backend="mlx", dtype=mx.float32)
    theirs = mlx_lm_model(directory)
    tokens = mx.random.randint(0, 200, (2, 9))
    for i in range(5):
        a, b = ours(tokens), theirs(tokens)
        print(
            f"run {i}: flashmoe finite {finite(a)}, mlx-lm finite {finite(b)}, "
            f"err {err(a, b) if finite(a) and finite(b) else float('nan'):.3g}",
            flush=True,
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=STAGES)
    p.add_argument("--dir")
    p.add_argument("--limit", type=int, default=90)
    args = p.parse_args()
    if args.stage:
        {
            "qmm": lambda: stage_qmm(Path(args.dir)),
            "gdn": stage_gdn,
            "model": lambda: stage_model(Path(args.dir)),
        }[args.stage]()
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_checkpoint(Path(tmp), "qwen3_next", group_size=128)
        print(f"qwen3_next g128 on {mx.default_device()}", flush=True)
        for stage in STAGES:
            print(f"== {stage}", flush=True)
            try:
                subprocess.run(
                    [
                        sys.executable,
                        "-X",
                        "faulthandler",
                        __file__,
                        "--stage",
                        stage,
                        "--dir",
                        str(directory),
                    ],
                    timeout=args.limit,
                )
            except subprocess.TimeoutExpired:
                print(f"== {stage}: still running after {args.limit} s (a hang?), stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
