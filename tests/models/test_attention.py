"""Attention and Gated DeltaNet against mlx-lm's own modules, on fresh random weights and inputs."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import cache as lm_cache
from mlx_lm.models import qwen2_moe, qwen3_5, qwen3_moe, qwen3_next
from mlx_lm.models.base import create_attention_mask

from flashmoe import kernels
from flashmoe.errors import FlashMoeError
from flashmoe.models.args import ModelArgs
from flashmoe.models.attention import Attention
from flashmoe.models.cache import KVCache, LinearAttentionCache
from flashmoe.models.gated_delta import GatedDeltaNet
from flashmoe.models.store import TensorStore
from flashmoe.quant import QuantSpec, Resolved
from tests.helpers import CONFIGS, rel_err

TOLERANCE = 1e-4  # float32
CHUNKS = (5, 3, 1)  # a prefill, a second prefill chunk after it, one decode step
VARIANTS = (
    "qwen3_next-attention",
    "qwen3_5_moe-attention",
    "qwen3_moe-attention",
    "qwen2_moe-attention",
    "qwen3_next-linear",
    "qwen3_5_moe-linear",
)


def config(model_type: str, **overrides) -> dict:
    """A copy of the tiny config (the text part for qwen3_5_moe), with overrides."""
    cfg = json.loads(json.dumps(CONFIGS[model_type]))
    text = cfg.get("text_config", cfg)
    text.update(overrides)
    return cfg


def reference_module(variant: str, cfg: dict) -> tuple[nn.Module, str]:
    """mlx-lm's own module for `variant`, and the checkpoint prefix it lives under."""
    model_type, kind = variant.split("-")
    if model_type == "qwen3_5_moe":
        args = qwen3_5.TextModelArgs.from_dict(cfg["text_config"])
        module = qwen3_5.GatedDeltaNet(args) if kind == "linear" else qwen3_5.Attention(args)
        layer = "language_model.model.layers.2"
    else:
        lm = {"qwen3_next": qwen3_next, "qwen3_moe": qwen3_moe, "qwen2_moe": qwen2_moe}[model_type]
        args = lm.ModelArgs.from_dict(cfg)
        if kind == "linear":
            module = qwen3_next.Qwen3NextGatedDeltaNet(args)
        elif model_type == "qwen3_next":
            module = qwen3_next.Qwen3NextAttention(args)
        elif model_type == "qwen3_moe":
            module = qwen3_moe.Attention(args, 3)
        else:
            module = qwen2_moe.Attention(args)
        layer = "model.layers.3"
    module.eval()
    return module, f"{layer}.linear_attn" if kind == "linear" else f"{layer}.self_attn"


def randomize(module: nn.Module) -> nn.Module:
    """Every parameter (norm weights, A_log, dt_bias, conv, biases too) fresh uniform random, float32."""

    def fresh(p: mx.array) -> mx.array:
        scale = p.shape[-1] ** -0.5 if p.ndim > 1 else 1.0  # keep projections' outputs O(1)
        return mx.random.uniform(-1, 1, p.shape) * scale

    before = dict(tree_flatten(module.parameters()))
    module.update(tree_map(fresh, module.parameters()))
    after = dict(tree_flatten(module.parameters()))
    assert before.keys() == after.keys() and all(not mx.array_equal(before[k], after[k]) for k in before)
    return module


def build(variant: str, cfg: dict, *, quantize: bool = False, backend: str = "mlx"):
    """(mlx-lm module, flashmoe module) sharing the same random (optionally 4-bit) weights."""
    ref, prefix = reference_module(variant, cfg)
    randomize(ref)
    if quantize:
        nn.quantize(ref, group_size=64, bits=4)
    tensors = {f"{prefix}.{name}": value for name, value in tree_flatten(ref.parameters())}
    modules = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".scales")}
    assert not quantize or len(modules) >= 3, f"nothing quantized: {sorted(tensors)}"
    specs = {m: Resolved(m, QuantSpec(4, 64), "test") for m in modules}
    store = TensorStore(tensors, specs=specs, backend=backend, source="test")
    cls = GatedDeltaNet if variant.endswith("linear") else Attention
    ours = cls(store, prefix, ModelArgs.from_config(cfg))
    store.finish()  # every exported tensor was taken
    return ref, ours


def caches(variant: str):
    """Fresh (mlx-lm, flashmoe) caches for `variant`."""
    if variant.endswith("linear"):
        return lm_cache.ArraysCache(size=2), LinearAttentionCache()
    return lm_cache.KVCache(), KVCache()


def run_reference(ref: nn.Module, variant: str, x: mx.array, cache=None) -> mx.array:
    """mlx-lm's module on x, with the mask its model would build."""
    mask = None if variant.endswith("linear") else create_attention_mask(x, cache)
    return ref(x, mask, cache)


def assert_close(y: mx.array, ref: mx.array, what: str) -> float:
    assert y.shape == ref.shape, f"{what}: shape {y.shape} vs {ref.shape}"
    assert mx.max(mx.abs(ref)).item() > 1e-3, f"{what}: reference output is ~0, the comparison means nothing"
    err = rel_err(y, ref)
    assert err < TOLERANCE, f"{what}: rel err {err:.3g}"
    return err


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_sequence_matches_mlx_lm(variant, seed):
    model_type = variant.split("-")[0]
    ref, ours = build(variant, config(model_type))
    x = mx.random.normal((2, 7, 128))
    assert_close(ours(x), run_reference(ref, variant, x), f"{variant} (seed {seed})")


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill_and_decode_match_mlx_lm(variant, seed):
    model_type = variant.split("-")[0]
    ref, ours = build(variant, config(model_type))
    ref_cache, our_cache = caches(variant)
    for i, t in enumerate(CHUNKS):
        x = mx.random.normal((2, t, 128))
        y = ours(x, our_cache)
        assert_close(
            y,
            run_reference(ref, variant, x, ref_cache),
            f"{variant} chunk {i} (T={t}, seed {seed})",
        )
    assert our_cache.offset == sum(CHUNKS)
    if variant.endswith("linear"):
        assert our_cache.state_.dtype == mx.float32
        assert our_cache.conv.shape == (2, 3, ref_cache[0].shape[-1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_then_decode_equals_full_forward(variant, seed):
    """Our own caches: chunk by chunk gives what one pass over the whole sequence gives."""
    model_type = variant.split("-")[0]
    _, ours = build(variant, config(model_type))
    x = mx.random.normal((2, sum(CHUNKS), 128))
    full = ours(x)
    cache, start = caches(variant)[1], 0
    for t in CHUNKS:
        part = ours(x[:, start : start + t], cache)
        assert_close(
            part,
            full[:, start : start + t],
            f"{variant} positions {start}..{start + t} (seed {seed})",
        )
        start += t


@pytest.mark.parametrize("backend", kernels.available_backends())
@pytest.mark.parametrize("variant", VARIANTS)
def test_quantized_prefill_and_decode_match_mlx_lm(variant, backend, seed):
    """4-bit g64 projections: prefill through quantized_matmul, decode (one row) through `backend`."""
    model_type = variant.split("-")[0]
    ref, ours = build(variant, config(model_type), quantize=True, backend=backend)
    out_proj = ours.out_proj if variant.endswith("linear") else ours.o_proj
    assert out_proj.spec == QuantSpec(4, 64) and out_proj.backend == backend
    ref_cache, our_cache = caches(variant)
    for i, t in enumerate((5, 1, 1)):
        x = mx.random.normal((1, t, 128))
        y = ours(x, our_cache)
        what = f"{variant} quantized {backend} step {i} (T={t}, seed {seed})"
        assert_close(y, run_reference(ref, variant, x, ref_cache), what)


def test_linear_rope_scaling_matches_mlx_lm(seed):
    cfg = config("qwen3_next", rope_scaling={"type": "linear", "factor": 4.0})
    ref, ours = build("qwen3_next-attention", cfg)
    ref_cache, our_cache = caches("qwen3_next-attention")
    for t in (6, 1):
        x = mx.random.normal((1, t, 128))
        y = ours(x, our_cache)
        ref_y = run_reference(ref, "qwen3_next-attention", x, ref_cache)
        assert_close(y, ref_y, f"linear rope scaling T={t} (seed {seed})")


def test_unsupported_rope_scaling_is_refused():
    cfg = config("qwen3_moe", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    store = TensorStore({})
    with pytest.raises(FlashMoeError, match="'yarn'"):
        Attention(store, "model.layers.0.self_attn", ModelArgs.from_config(cfg))


def test_missing_projection_names_the_tensor():
    ref, prefix = reference_module("qwen3_next-linear", config("qwen3_next"))
    tensors = {f"{prefix}.{k}": v for k, v in tree_flatten(ref.parameters()) if "in_proj_qkvz" not in k}
    with pytest.raises(FlashMoeError, match="in_proj_qkvz.weight"):
        GatedDeltaNet(TensorStore(tensors), prefix, ModelArgs.from_config(config("qwen3_next")))


def test_conv_weight_in_checkpoint_layout_is_refused():
    """An unsanitized (C, 1, W) conv kernel would convolve the wrong axis: refuse it, naming the tensor."""
    ref, prefix = reference_module("qwen3_5_moe-linear", config("qwen3_5_moe"))
    tensors = {f"{prefix}.{k}": v for k, v in tree_flatten(ref.parameters())}
    tensors[f"{prefix}.conv1d.weight"] = tensors[f"{prefix}.conv1d.weight"].moveaxis(2, 1)  # (C, 1, W)
    with pytest.raises(FlashMoeError, match="conv1d.weight"):
        GatedDeltaNet(TensorStore(tensors), prefix, ModelArgs.from_config(config("qwen3_5_moe")))
