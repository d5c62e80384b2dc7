"""The bf16 distance test, position by position, beside a second bf16 path of mlx-lm's own.

tests/models/test_gpu_path.py::test_bfloat16_logits_no_farther_from_float32_than_mlx_lm compares one
number per engine: the largest distance from the float32 logits over 32 teacher-forced decode steps
(rel_err). Errors made at step 1 are carried in the KV cache and the Gated DeltaNet state to every
later step and grow there, so that number is mostly the last steps'. This prints, per checkpoint seed,
the distance at the first decode step (one pass through the layers after the prompt: the least
amplified), the largest over the first 4, and the test's number over all 32, for:

    mlx-lm         as the test runs it (the prompt in one call)
    mlx-lm 1x1     mlx-lm again with the prompt fed one token at a time: the same model, the same
                   dtype, only the prompt's matmuls rounded as matvecs; a bf16 path as valid as the first
    flashmoe       the GPU kernels (--backend), the prompt in one call, as the test
    one rounding   float32 throughout (the reference backend, as the truth) but for one bf16 rounding
                   of the embedding rows: how far a single rounding at the input carries

How far apart the two mlx-lm rows land, and how far one rounding carries, say how much of the test's
comparison is rounding noise grown through the steps.

    python benchmarks/bf16_positions.py [--seeds 5] [--backend cuda] [--models qwen3_next,qwen3_5_moe]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bf16_seeds import PROMPT, checkpoint_case  # noqa: E402 (this directory, first on sys.path)

from flashmoe.analysis.parity import WithCache, forced_decode_logits  # noqa: E402
from flashmoe.loader import load_model  # noqa: E402
from tests.helpers import CONFIGS  # noqa: E402

ROWS = ("mlx-lm", "mlx-lm 1x1", "flashmoe", "one rounding")


class PromptOneByOne(WithCache):
    """mlx-lm's model with a prompt of T tokens fed as T calls of one token (decode calls pass through)."""

    def __call__(self, tokens: mx.array, cache: list) -> mx.array:
        outs = [self.model(tokens[:, t : t + 1], cache) for t in range(tokens.shape[1])]
        return mx.concatenate(outs, axis=1)


class RoundedOnce:
    """An embedding whose rows come out rounded to bf16 once (and back to the model's dtype)."""

    def __init__(self, embedding):
        self.embedding = embedding

    def __call__(self, tokens: mx.array) -> mx.array:
        rows = self.embedding(tokens)
        return rows.astype(mx.bfloat16).astype(rows.dtype)

    def __getattr__(self, name: str):
        return getattr(self.embedding, name)


def per_position(logits: mx.array, truth: mx.array) -> np.ndarray:
    """max |logits - truth| per step / max |truth| over all steps: rel_err is this array's max."""
    y, ref = np.array(logits.astype(mx.float32)), np.array(truth.astype(mx.float32))
    return np.abs(y - ref).max(axis=-1) / max(np.abs(ref).max(), 1e-30)


def distances(model_type: str, seed: int, backend: str) -> dict[str, np.ndarray]:
    with checkpoint_case(model_type, seed) as (directory, reference, fed, truth):
        rounded = load_model(directory, backend="reference", dtype=mx.float32)
        rounded.embed_tokens = RoundedOnce(rounded.embed_tokens)
        return {
            "mlx-lm": per_position(forced_decode_logits(WithCache(reference), PROMPT, fed), truth),
            "mlx-lm 1x1": per_position(forced_decode_logits(PromptOneByOne(reference), PROMPT, fed), truth),
            "flashmoe": per_position(
                forced_decode_logits(load_model(directory, backend=backend), PROMPT, fed), truth
            ),
            "one rounding": per_position(forced_decode_logits(rounded, PROMPT, fed), truth),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--models", default=",".join(sorted(CONFIGS)))
    args = parser.parse_args()
    print(f"mlx {mx.__version__} {mx.default_device()}, flashmoe backend {args.backend}, bf16 as stored")
    print("distance from float32 logits: step 1 / largest of steps 1-4 / largest of all 32 (the test's)")
    for model_type in args.models.split(","):
        firsts = {row: [] for row in ROWS}
        for seed in range(args.seeds):
            run = distances(model_type, seed, args.backend)
            cells = "   ".join(
                f"{row} {d[0]:.4f} / {d[:4].max():.4f} / {d.max():.4f}" for row, d in run.items()
            )
            print(f"{model_type:12s} s{seed}  {cells}")
            for row in ROWS:
                firsts[row].append(run[row])
        for row in ROWS:
            d = np.array(firsts[row])  # (seeds, steps)
            print(
                f"{'':12s} mean {row:10s} step 1 {d[:, 0].mean():.4f}   steps 1-4 {d[:, :4].max(1).mean():.4f}"
                f"   all {d.max(1).mean():.4f}"
            )


if __name__ == "__main__":
    main()
