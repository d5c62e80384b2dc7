"""Where a forward pass first goes non-finite: every phase flashmoe marks (embedding, each layer's
mixer and MoE parts, output), per backend and dtype, on one of the test suite's tiny checkpoints;
then mlx-lm's logits, and MLX's quantized_matmul on this device against the CPU for every
quantized matrix of the checkpoint.

    python benchmarks/nan_probe.py [--model-type qwen3_next] [--group-size 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashmoe import quant  # noqa: E402
from flashmoe.analysis.parity import mlx_lm_model  # noqa: E402
from flashmoe.loader import load_model  # noqa: E402
from flashmoe.timing import timer  # noqa: E402
from tests.helpers import write_checkpoint  # noqa: E402


def finite(a: mx.array) -> bool:
    return bool(mx.all(mx.isfinite(a.astype(mx.float32))).item())


def probe(directory: Path, backend: str, dtype, tokens: mx.array) -> None:
    model = load_model(directory, backend=backend, dtype=dtype)
    seen: list[str] = []

    def mark(phase, *arrays):
        bad = [i for i, a in enumerate(arrays) if isinstance(a, mx.array) and not finite(a)]
        seen.append(f"{phase}{'!' if bad else ''}")

    timer.mark, saved = mark, timer.mark
    try:
        logits = model(tokens)
        mx.eval(logits)
    finally:
        timer.mark = saved
    first = next((i for i, s in enumerate(seen) if s.endswith("!")), None)
    where = (
        "none" if first is None else f"phase {first}: {seen[first]} (after {seen[max(0, first - 3) : first]})"
    )
    print(
        f"{backend:>9} {str(dtype):>14}: logits finite {finite(logits)}; {len(seen)} marks, first non-finite: {where}"
    )


def qmm_against_cpu(directory: Path) -> None:
    """MLX's quantized_matmul on this device against the CPU, for every quantized matrix of the
    checkpoint, each with the spec its config.json gives it (flashmoe.quant, as the loader reads it)."""
    plan = quant.resolve(json.loads((directory / "config.json").read_text()))
    weights = {}
    for f in sorted(directory.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    worst = (0.0, "none")
    for prefix in sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales")):
        spec, w = plan.spec_for(prefix), weights[prefix + ".weight"]
        if spec is None or w.ndim != 2:
            continue
        packed = (w, weights[prefix + ".scales"], weights.get(prefix + ".biases"))
        x = mx.random.normal((2, w.shape[1] * 32 // spec.bits))
        kw = dict(group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
        gpu = mx.quantized_matmul(x, *packed, **kw)
        cpu = mx.quantized_matmul(x, *packed, **kw, stream=mx.cpu)
        err = float(mx.abs(gpu - cpu).max().item() / (mx.abs(cpu).max().item() + 1e-30))
        where = f"{prefix} {tuple(w.shape)} {spec}"
        if not finite(gpu):
            print(f"  NON-FINITE quantized_matmul on {mx.default_device()}: {where}")
        elif err > worst[0]:
            worst = (err, where)
    print(f"quantized_matmul, this device against the CPU: worst max-abs/max {worst[0]:.3g} at {worst[1]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-type", default="qwen3_next")
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_checkpoint(Path(tmp), args.model_type, group_size=args.group_size)
        print(f"{args.model_type} g{args.group_size} on {mx.default_device()}")
        tokens = mx.random.randint(0, 200, (2, 9))
        for backend, dtype in (("mlx", mx.float32), ("reference", mx.float32), ("mlx", mx.bfloat16)):
            probe(directory, backend, dtype, tokens)
        for backend in ("cuda", "metal"):
            from flashmoe import kernels

            if kernels.backend_available(backend):
                probe(directory, backend, mx.float32, tokens)
                probe(directory, backend, mx.bfloat16, tokens)
        ref = mlx_lm_model(directory)
        print(f"mlx-lm logits finite: {finite(ref(tokens))}")
        qmm_against_cpu(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
