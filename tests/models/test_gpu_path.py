"""The model on the CUDA backend, the way decode.py runs it (fused kernels, compiled layers, KV
buffers), against the reference backend and against mlx-lm. Runs on an NVIDIA GPU only.

tests/models/test_fused_path.py checks the same plumbing everywhere with the pure-MLX references in
the kernels' place; tests/kernels checks each kernel alone. This is the one place they meet."""

from __future__ import annotations

import mlx.core as mx
import pytest

from flashmoe.analysis.parity import forced_decode_logits, greedy_tokens, mlx_lm_cache, mlx_lm_model
from flashmoe.loader import load_model
from tests.helpers import CONFIGS, needs_cuda, rel_err, write_checkpoint

PROMPT, TOKENS = [3, 17, 42, 9, 77], [5, 61, 12, 250, 7, 99]


@needs_cuda
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_float32_logits_match_the_reference_backend(model_type, tmp_path):
    directory = write_checkpoint(tmp_path / model_type, model_type)
    ours = load_model(directory, backend="cuda", dtype=mx.float32)
    assert all(layer.compiled for layer in ours.layers)
    reference = load_model(directory, backend="reference", dtype=mx.float32)
    got, want = forced_decode_logits(ours, PROMPT, TOKENS), forced_decode_logits(reference, PROMPT, TOKENS)
    assert rel_err(got, want) < 1e-4


@needs_cuda
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_bfloat16_greedy_tokens_match_mlx_lm(model_type, tmp_path):
    """32 greedy tokens in the checkpoint's bf16 on both sides (where bf16 rounding could part them,
    the first differing step is in the failure message)."""
    directory = write_checkpoint(tmp_path / model_type, model_type)
    ours = load_model(directory, backend="cuda")
    reference = mlx_lm_model(directory, dtype=None)
    prompt = [1, 17, 42, 99, 3]
    theirs = greedy_tokens(reference, mlx_lm_cache(reference), prompt, 32)
    mine = greedy_tokens(ours, ours.make_cache, prompt, 32)
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
    assert mine == theirs, f"first difference at step {first}: {mine[first]} against {theirs[first]}"
