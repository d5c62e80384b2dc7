"""Where bf16 greedy decoding parts flashmoe from mlx-lm, and whether rounding explains it.

For each tiny test architecture: mlx-lm's 32 greedy bf16 tokens, then every engine teacher-forced on
that sequence. Per step it prints mlx-lm's margin (top-1 minus top-2 logit), whether each engine picks
the same token, and each engine's distance to float32 logits (flashmoe's reference backend, which the
tests hold to mlx-lm in float32). Two engines that are both this far from float32 and part where the
margin is below that distance part by rounding, not by a bug.

    python benchmarks/bf16_parting.py [--backends auto,mlx] [--steps 32]
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
from tests.helpers import CONFIGS, write_checkpoint  # noqa: E402

PROMPT = [1, 17, 42, 99, 3]  # as tests/models/test_gpu_path.py


def distance(logits: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per step: max |logits - truth| / max |truth|."""
    return np.abs(logits - truth).max(axis=1) / np.abs(truth).max(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="auto,mlx")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    backends = args.backends.split(",")
    print(f"mlx {mx.__version__} {mx.default_device()}")
    for model_type in sorted(CONFIGS):
        with tempfile.TemporaryDirectory() as tmp:
            directory = write_checkpoint(Path(tmp) / model_type, model_type)
            theirs_model = mlx_lm_model(directory, dtype=None)
            theirs = greedy_tokens(theirs_model, mlx_lm_cache(theirs_model), PROMPT, args.steps)
            # forced logits after each of theirs[:-1] predict theirs[1:]
            fed = theirs[:-1]
            engines = {"mlx-lm": WithCache(theirs_model)}
            engines.update({f"flashmoe {b}": load_model(directory, backend=b) for b in backends})
            truth_model = load_model(directory, backend="reference", dtype=mx.float32)
            truth = np.array(forced_decode_logits(truth_model, PROMPT, fed).astype(mx.float32))
            logits = {
                name: np.array(forced_decode_logits(m, PROMPT, fed).astype(mx.float32))
                for name, m in engines.items()
            }
        top2 = np.sort(logits["mlx-lm"], axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        print(f"\n{model_type}: mlx-lm's greedy tokens 2..{args.steps}, teacher-forced")
        names = list(engines)
        print("step  token  margin  " + "  ".join(f"{n:>22}" for n in names) + "   float32 picks")
        for step, token in enumerate(theirs[1:], start=2):
            i = step - 2
            cells = []
            for name in names:
                pick = int(logits[name][i].argmax())
                mark = "=" if pick == token else f"!{pick}"
                cells.append(f"{mark:>6} d={distance(logits[name][i : i + 1], truth[i : i + 1])[0]:.2e}")
            print(
                f"{step:4d} {token:6d} {margin[i]:7.4f}  "
                + "  ".join(f"{c:>22}" for c in cells)
                + f"   {int(truth[i].argmax())}"
            )
        for name in names:
            agree = int((logits[name].argmax(axis=1) == np.array(theirs[1:])).sum())
            print(
                f"{name}: same pick as mlx-lm at {agree}/{len(fed)} steps; distance to float32 "
                f"median {np.median(distance(logits[name], truth)):.2e}, max {distance(logits[name], truth).max():.2e}"
            )


if __name__ == "__main__":
    main()
