"""flashmoe's forward pass against mlx-lm's on the same tiny checkpoints (written by mlx-lm itself)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from flashmoe.analysis.parity import greedy_tokens, mlx_lm_cache, mlx_lm_model
from flashmoe.loader import load_model
from tests.helpers import CONFIGS, rel_err, write_checkpoint

TOLERANCE = 1e-3  # float32 (a GPU float32 matmul may round through TF32, ~1e-3)


VARIANTS = {  # name: (model_type, write_checkpoint options, config overrides)
    **{t: (t, {}, {}) for t in CONFIGS},
    "qwen3_moe-g32": ("qwen3_moe", {"group_size": 32}, {}),
    # every matrix 256 wide (two groups a row): MLX's CUDA quantized_matmul is wrong at K = group size
    # = 128 (H200, MLX 0.32.4: benchmarks/gpu_nan_stages.py), and both engines run it here
    "qwen3_next-g128": (
        "qwen3_next",
        {"group_size": 128},
        dict(
            hidden_size=256,
            head_dim=64,
            moe_intermediate_size=256,
            shared_expert_intermediate_size=256,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
        ),
    ),
    "qwen3_next-2bit-experts": ("qwen3_next", {"bits": 2}, {}),
    "qwen3_moe-tied-no-renorm": (
        "qwen3_moe",
        {},
        {"tie_word_embeddings": True, "norm_topk_prob": False},
    ),
    "qwen3_next-no-renorm": ("qwen3_next", {}, {"norm_topk_prob": False}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    model_type, options, overrides = VARIANTS[request.param]
    directory = write_checkpoint(
        tmp_path_factory.mktemp(request.param), model_type, overrides=overrides, **options
    )
    # float32 on both sides, on any device (a GPU's default compute dtype is the checkpoint's bf16)
    return (
        directory,
        load_model(directory, backend="mlx", dtype=mx.float32),
        mlx_lm_model(directory),
    )


def test_logits_match_mlx_lm(pair, seed):
    _, ours, reference = pair
    tokens = mx.random.randint(0, ours.args.vocab_size, (2, 9))
    err = rel_err(ours(tokens), reference(tokens))
    assert err < TOLERANCE, f"rel err {err:.3g} (seed {seed})"


def test_32_greedy_tokens_match_mlx_lm(pair):
    _, ours, reference = pair
    prompt = [1, 17, 42, 99, 3]
    theirs = greedy_tokens(reference, mlx_lm_cache(reference), prompt, 32)
    assert greedy_tokens(ours, ours.make_cache, prompt, 32) == theirs


def test_prefill_then_decode_equals_a_full_forward(pair, seed):
    _, ours, _ = pair
    tokens = mx.random.randint(0, ours.args.vocab_size, (1, 12))
    full = ours(tokens)
    cache = ours.make_cache()
    steps = [ours(tokens[:, :5], cache), ours(tokens[:, 5:8], cache)]
    steps += [ours(tokens[:, t : t + 1], cache) for t in range(8, 12)]
    err = rel_err(mx.concatenate(steps, axis=1), full)
    assert err < 1e-4, f"rel err {err:.3g} (seed {seed})"
