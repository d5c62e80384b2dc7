"""flashmoe's forward pass against mlx-lm's on the same tiny checkpoints (written by mlx-lm itself)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_map

from flashmoe.loading import load_model

from .conftest import rel_err
from .tiny_checkpoints import CONFIGS, write_checkpoint

TOLERANCE = 1e-3  # float32, as the issue sets it


def mlx_lm_float32(directory):
    """mlx-lm's own model for the checkpoint, every float parameter cast to float32 (exact for bf16)."""
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(directory)
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    return model


def greedy(model, make_cache, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding: prefill the prompt, then one token at a time."""
    cache = make_cache()
    logits = model(mx.array([prompt]), cache=cache)
    out = []
    for _ in range(steps):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return out


VARIANTS = {  # name: (model_type, write_checkpoint options, config overrides)
    **{t: (t, {}, {}) for t in CONFIGS},
    "qwen3_moe-g32": ("qwen3_moe", {"group_size": 32}, {}),
    "qwen3_next-g128": ("qwen3_next", {"group_size": 128}, {}),
    "qwen3_next-2bit-experts": ("qwen3_next", {"bits": 2}, {}),
    "qwen3_moe-tied-no-renorm": ("qwen3_moe", {}, {"tie_word_embeddings": True, "norm_topk_prob": False}),
    "qwen3_next-no-renorm": ("qwen3_next", {}, {"norm_topk_prob": False}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    model_type, options, overrides = VARIANTS[request.param]
    directory = write_checkpoint(tmp_path_factory.mktemp(request.param), model_type, overrides=overrides, **options)
    return directory, load_model(directory, backend="mlx"), mlx_lm_float32(directory)


def test_logits_match_mlx_lm(pair, seed):
    _, ours, reference = pair
    tokens = mx.random.randint(0, ours.args.vocab_size, (2, 9))
    err = rel_err(ours(tokens), reference(tokens))
    assert err < TOLERANCE, f"rel err {err:.3g} (seed {seed})"


def test_32_greedy_tokens_match_mlx_lm(pair):
    _, ours, reference = pair
    prompt = [1, 17, 42, 99, 3]
    from mlx_lm.models.cache import make_prompt_cache

    theirs = greedy(reference, lambda: make_prompt_cache(reference), prompt, 32)
    assert greedy(ours, ours.make_cache, prompt, 32) == theirs


def test_prefill_then_decode_equals_a_full_forward(pair, seed):
    _, ours, _ = pair
    tokens = mx.random.randint(0, ours.args.vocab_size, (1, 12))
    full = ours(tokens)
    cache = ours.make_cache()
    steps = [ours(tokens[:, :5], cache), ours(tokens[:, 5:8], cache)]
    steps += [ours(tokens[:, t : t + 1], cache) for t in range(8, 12)]
    err = rel_err(mx.concatenate(steps, axis=1), full)
    assert err < 1e-4, f"rel err {err:.3g} (seed {seed})"
