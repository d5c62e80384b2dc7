"""The bf16 distance test over several checkpoints: is one random checkpoint enough to decide it?

tests/models/test_gpu_path.py::test_bfloat16_logits_no_farther_from_float32_than_mlx_lm asks, on one
tiny random checkpoint (seed 0), that flashmoe's bf16 logits (teacher-forced on mlx-lm's 32 greedy
bf16 tokens) be no farther from float32 logits (flashmoe's reference backend) than mlx-lm's bf16
logits are. This prints the same two distances (rel_err, as the test computes them) for checkpoint
seeds 0..N-1 of each architecture, and their means.

    python benchmarks/bf16_seeds.py [--seeds 5] [--backend cuda] [--models qwen3_next,qwen3_5_moe]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashmoe.analysis.parity import (  # noqa: E402
    WithCache,
    forced_decode_logits,
    greedy_tokens,
    mlx_lm_cache,
    mlx_lm_model,
)
from flashmoe.loader import load_model  # noqa: E402
from tests.helpers import CONFIGS, rel_err, write_checkpoint  # noqa: E402

PROMPT = [1, 17, 42, 99, 3]  # as the test


def distances(model_type: str, seed: int, backend: str) -> tuple[float, float]:
    """(flashmoe's, mlx-lm's) bf16 distance from float32 on the checkpoint of `seed`."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_checkpoint(Path(tmp) / model_type, model_type, seed=seed)
        reference = mlx_lm_model(directory, dtype=None)
        fed = greedy_tokens(reference, mlx_lm_cache(reference), PROMPT, 32)[:-1]
        truth = forced_decode_logits(load_model(directory, backend="reference", dtype=mx.float32), PROMPT, fed)
        mine = forced_decode_logits(load_model(directory, backend=backend), PROMPT, fed)
        theirs = forced_decode_logits(WithCache(reference), PROMPT, fed)
        return rel_err(mine, truth), rel_err(theirs, truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--models", default=",".join(sorted(CONFIGS)))
    args = parser.parse_args()
    print(f"mlx {mx.__version__} {mx.default_device()}, flashmoe backend {args.backend}, bf16 as stored")
    for model_type in args.models.split(","):
        pairs = np.array([distances(model_type, seed, args.backend) for seed in range(args.seeds)])
        nearer = int((pairs[:, 0] <= pairs[:, 1]).sum())
        cells = "  ".join(f"s{s} {a:.4f}/{b:.4f}" for s, (a, b) in enumerate(pairs))
        print(f"{model_type:12s} flashmoe/mlx-lm  {cells}")
        print(
            f"{'':12s} mean {pairs[:, 0].mean():.4f} / {pairs[:, 1].mean():.4f}; "
            f"flashmoe nearer or level on {nearer} of {args.seeds}"
        )


if __name__ == "__main__":
    main()
