"""The model on the CUDA backend, the way decode.py runs it (fused kernels, compiled layers, KV
buffers), against the reference backend and against mlx-lm. Runs on an NVIDIA GPU only.

tests/models/test_fused_path.py checks the same plumbing everywhere with the pure-MLX references in
the kernels' place; tests/kernels checks each kernel alone. This is the one place they meet."""

from __future__ import annotations

import mlx.core as mx
import pytest

from flashmoe.analysis.parity import (
    WithCache,
    forced_decode_logits,
    greedy_tokens,
    mlx_lm_cache,
    mlx_lm_model,
)
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


GATED_DELTA = ("qwen3_next", "qwen3_5_moe")  # hybrid models: Gated DeltaNet layers


@needs_cuda
@pytest.mark.parametrize("model_type", sorted(set(CONFIGS) - set(GATED_DELTA)))
def test_bfloat16_greedy_tokens_match_mlx_lm(model_type, tmp_path):
    """32 greedy tokens in the checkpoint's bf16 on both sides (where bf16 rounding could part them,
    the first differing step is in the failure message). On the hybrid models the two engines'
    bf16 tokens part (H200: qwen3_next at step 6, qwen3_5_moe too); there the check is the one below."""
    directory = write_checkpoint(tmp_path / model_type, model_type)
    ours = load_model(directory, backend="cuda")
    reference = mlx_lm_model(directory, dtype=None)
    prompt = [1, 17, 42, 99, 3]
    theirs = greedy_tokens(reference, mlx_lm_cache(reference), prompt, 32)
    mine = greedy_tokens(ours, ours.make_cache, prompt, 32)
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
    assert mine == theirs, f"first difference at step {first}: {mine[first]} against {theirs[first]}"


@needs_cuda
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_bfloat16_logits_no_farther_from_float32_than_mlx_lm(model_type, tmp_path):
    """Teacher-forced on mlx-lm's own 32 bf16 greedy tokens: flashmoe's bf16 logits (cuda path) are no
    farther from float32 logits (the reference backend) than mlx-lm's bf16 logits are.

    Open: on the H200 this fails for qwen3_next, 0.2747 against mlx-lm's 0.2677 (the tree of
    2026-12-01 before the compiled-step changes gives the same two numbers; 0.2712 with the shared
    expert inside the expert kernels, session 8; 0.2694 with the attention's gate in its kernel,
    session 9). Over checkpoint seeds 0-4 on the H200 (benchmarks/bf16_seeds.py, session 9) flashmoe
    is nearer or level on 4 of 5 for qwen2_moe and qwen3_moe, 3 of 5 for qwen3_5_moe and 1 of 5 for
    qwen3_next (mean 0.3615 against 0.3346): benchmarks/RESULTS.md, session 9. Session 10
    (benchmarks/bf16_positions.py, H200): mlx-lm itself, with only its prompt fed one token at a time,
    lands at 0.2694 on this checkpoint, and at 0.0620 for 0.0103 (qwen2_moe seed 4), 0.1137 for 0.0117
    (qwen3_moe seed 2); and one bf16 rounding of the embedding rows in an otherwise float32 model
    lands at 0.3910 on this checkpoint (this CPU). This number carries rounding noise grown through the
    cache and the recurrent state, larger than the margins it decides. Kept as it is until the team
    decides (RESULTS.md, session 10); tests/kernels/test_bf16_rounding.py checks the same intent per
    kernel, where no noise grows."""
    directory = write_checkpoint(tmp_path / model_type, model_type)
    reference = mlx_lm_model(directory, dtype=None)
    prompt = [1, 17, 42, 99, 3]
    fed = greedy_tokens(reference, mlx_lm_cache(reference), prompt, 32)[:-1]
    truth = forced_decode_logits(load_model(directory, backend="reference", dtype=mx.float32), prompt, fed)
    mine = forced_decode_logits(load_model(directory, backend="cuda"), prompt, fed)
    theirs = forced_decode_logits(WithCache(reference), prompt, fed)
    assert mine.dtype == mx.bfloat16
    assert rel_err(mine, truth) <= rel_err(theirs, truth), (
        f"{rel_err(mine, truth)} vs {rel_err(theirs, truth)}"
    )
