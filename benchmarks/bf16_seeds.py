"""The bf16 distance test over several checkpoints: is one random checkpoint enough to decide it?

tests/models/test_gpu_path.py::test_bfloat16_logits_no_farther_from_float32_than_mlx_lm asks, on one
tiny random checkpoint (seed 0), that flashmoe's bf16 logits (teacher-forced on mlx-lm's 32 greedy
bf16 tokens) be no farther from float32 logits (flashmoe's reference backend) than mlx-lm's bf16
logits are. This prints the same two distances (rel_err, as the test computes them) for checkpoint
seeds 0..N-1 of each architecture, and their means.

    python benchmarks/bf16_seeds.py [--seeds 5] [--backend cuda] [--models qwen3_next,qwen3_5_moe]

--apart: per checkpoint, flashmoe's distance again with one family of GPU kernels swapped for its
pure-MLX form at a time (matvec: mx.quantized_matmul; attention, gated_delta, moe: the kernels'
references; all: backend mlx), to find which family's rounding moves the logits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashmoe import kernels  # noqa: E402
from flashmoe.analysis.parity import (  # noqa: E402
    WithCache,
    forced_decode_logits,
    greedy_tokens,
    mlx_lm_cache,
    mlx_lm_model,
)
from flashmoe.loader import load_model  # noqa: E402
from flashmoe.models import attention, gated_delta, moe  # noqa: E402
from tests.helpers import CONFIGS, rel_err, write_checkpoint  # noqa: E402

PROMPT = [1, 17, 42, 99, 3]  # as the test


# a kernel family -> (module the model code calls it from, its name there, the backend of its pure-MLX form)
FAMILIES = {
    "matvec": [(kernels, "dequant_matvec", "mlx")],
    "attention": [(attention, "decode_attention", "reference"), (attention, "qk_norm_rope", "reference")],
    "gated_delta": [(gated_delta, "gated_delta_step", "reference")],
    "moe": [(moe, name, "reference") for name in ("moe_gate_up", "routed_gate_up", "moe_down", "route")],
}


def _with_backend(fn, backend: str):
    """fn with its `backend` argument replaced, whatever the caller passes."""

    def call(*args, **kwargs):
        return fn(*args, **{**kwargs, "backend": backend})

    return call


@contextmanager
def pure_mlx(family: str):
    """The model code's calls to `family`'s kernels run their pure-MLX form while inside."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in FAMILIES[family]]
    try:
        for (module, name, backend), (_, _, fn) in zip(FAMILIES[family], saved):
            setattr(module, name, _with_backend(fn, backend))
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


@contextmanager
def checkpoint_case(model_type: str, seed: int):
    """The test's setup on the checkpoint of `seed` (deleted after): (directory, mlx-lm's model in the
    checkpoint's bf16, mlx-lm's 31 greedy tokens fed after PROMPT, float32 logits of the reference
    backend on them)."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_checkpoint(Path(tmp) / model_type, model_type, seed=seed)
        reference = mlx_lm_model(directory, dtype=None)
        fed = greedy_tokens(reference, mlx_lm_cache(reference), PROMPT, 32)[:-1]
        truth = forced_decode_logits(
            load_model(directory, backend="reference", dtype=mx.float32), PROMPT, fed
        )
        yield directory, reference, fed, truth


def distances(model_type: str, seed: int, backend: str, apart: bool = False) -> dict[str, float]:
    """bf16 distances from float32 on the checkpoint of `seed`: mlx-lm's, flashmoe's, and with --apart
    flashmoe's with each kernel family in its pure-MLX form."""
    with checkpoint_case(model_type, seed) as (directory, reference, fed, truth):
        out = {"mlx-lm": rel_err(forced_decode_logits(WithCache(reference), PROMPT, fed), truth)}
        out["flashmoe"] = rel_err(
            forced_decode_logits(load_model(directory, backend=backend), PROMPT, fed), truth
        )
        if apart:
            for family in FAMILIES:
                with pure_mlx(family):
                    model = load_model(directory, backend=backend)
                    out[family] = rel_err(forced_decode_logits(model, PROMPT, fed), truth)
            out["all"] = rel_err(
                forced_decode_logits(load_model(directory, backend="mlx"), PROMPT, fed), truth
            )
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--models", default=",".join(sorted(CONFIGS)))
    parser.add_argument("--apart", action="store_true", help="also with each kernel family in pure MLX")
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args()
    print(f"mlx {mx.__version__} {mx.default_device()}, flashmoe backend {args.backend}, bf16 as stored")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for model_type in args.models.split(","):
        runs = [distances(model_type, seed, args.backend, args.apart) for seed in seeds]
        if args.apart:
            for seed, run in zip(seeds, runs):
                print(f"{model_type} seed {seed}: " + "  ".join(f"{k} {v:.4f}" for k, v in run.items()))
        pairs = np.array([(run["flashmoe"], run["mlx-lm"]) for run in runs])
        nearer = int((pairs[:, 0] <= pairs[:, 1]).sum())
        cells = "  ".join(f"s{s} {a:.4f}/{b:.4f}" for s, (a, b) in zip(seeds, pairs))
        print(f"{model_type:12s} flashmoe/mlx-lm  {cells}")
        print(
            f"{'':12s} mean {pairs[:, 0].mean():.4f} / {pairs[:, 1].mean():.4f}; "
            f"flashmoe nearer or level on {nearer} of {args.seeds}"
        )


if __name__ == "__main__":
    main()
