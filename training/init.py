"""Seeded initial parameters for a qwen3_next config, named and shaped as mlx-lm saves them.

Shape letters: V vocab, D hidden, L layers, E experts, I expert width, S shared-expert width,
H / H_kv attention heads, hd head_dim, H_k / H_v linear-attention heads, d_k / d_v their widths,
C conv channels, W conv width.

Drawn with numpy (PCG64) so the same seed gives the same bits on any machine and MLX backend.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from flashmoe.config import ModelArgs

STD = 0.02  # projections and embeddings (GPT-2's choice)


def param_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor flashmoe's Model takes for this qwen3_next config."""
    a = ModelArgs.from_config(config)
    if a.model_type != "qwen3_next":
        raise ValueError(f"training builds qwen3_next models, found model_type {a.model_type!r}")
    D = a.hidden_size
    shapes = {"model.embed_tokens.weight": (a.vocab_size, D), "model.norm.weight": (D,)}
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (D,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (D,)
        shapes.update(_linear_attention(a, f"{p}.linear_attn") if a.is_linear_attention(i)
                      else _attention(a, f"{p}.self_attn"))
        shapes.update(_moe(a, f"{p}.mlp") if a.is_moe(i) else _mlp(f"{p}.mlp", D, a.intermediate_size))
    if not a.tie_word_embeddings:
        shapes["lm_head.weight"] = (a.vocab_size, D)
    return shapes


def _attention(a: ModelArgs, p: str) -> dict:
    D, hd = a.hidden_size, a.head_dim
    return {
        f"{p}.q_proj.weight": (2 * a.num_attention_heads * hd, D),  # query and output gate per head
        f"{p}.k_proj.weight": (a.num_key_value_heads * hd, D),
        f"{p}.v_proj.weight": (a.num_key_value_heads * hd, D),
        f"{p}.o_proj.weight": (D, a.num_attention_heads * hd),
        f"{p}.q_norm.weight": (hd,),
        f"{p}.k_norm.weight": (hd,),
    }


def _linear_attention(a: ModelArgs, p: str) -> dict:
    D = a.hidden_size
    key_dim = a.linear_num_key_heads * a.linear_key_head_dim  # H_k * d_k
    value_dim = a.linear_num_value_heads * a.linear_value_head_dim  # H_v * d_v
    H_v = a.linear_num_value_heads
    return {
        f"{p}.in_proj_qkvz.weight": (2 * key_dim + 2 * value_dim, D),
        f"{p}.in_proj_ba.weight": (2 * H_v, D),
        f"{p}.conv1d.weight": (2 * key_dim + value_dim, a.linear_conv_kernel_dim, 1),  # (C, W, 1)
        f"{p}.A_log": (H_v,),
        f"{p}.dt_bias": (H_v,),
        f"{p}.norm.weight": (a.linear_value_head_dim,),
        f"{p}.out_proj.weight": (D, value_dim),
    }


def _moe(a: ModelArgs, p: str) -> dict:
    D, E, I, S = a.hidden_size, a.num_experts, a.moe_intermediate_size, a.shared_expert_intermediate_size
    shapes = {
        f"{p}.gate.weight": (E, D),
        f"{p}.switch_mlp.gate_proj.weight": (E, I, D),
        f"{p}.switch_mlp.up_proj.weight": (E, I, D),
        f"{p}.switch_mlp.down_proj.weight": (E, D, I),
    }
    if S:
        shapes.update(_mlp(f"{p}.shared_expert", D, S))
        shapes[f"{p}.shared_expert_gate.weight"] = (1, D)
    return shapes


def _mlp(p: str, D: int, width: int) -> dict:
    return {f"{p}.gate_proj.weight": (width, D), f"{p}.up_proj.weight": (width, D), f"{p}.down_proj.weight": (D, width)}


def init_value(name: str, shape: tuple[int, ...], rng: np.random.Generator, num_layers: int) -> np.ndarray:
    """One tensor's initial value (float32); the rule is chosen by the tensor's name."""
    if name.endswith("norm.weight"):  # every RMSNorm, linear_attn.norm included: mlx-lm's layout holds the +1
        return np.ones(shape, np.float32)
    if name.endswith("A_log"):  # per-head decay rates exp(A) in [1, 16], as Qwen3-Next initialises them
        return np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
    if name.endswith("dt_bias"):
        return np.ones(shape, np.float32)
    if name.endswith("conv1d.weight"):  # the spread of PyTorch's default conv init, 1 / sqrt(3 W)
        return rng.normal(0.0, 1.0 / math.sqrt(3 * shape[1]), shape).astype(np.float32)
    std = STD
    if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
        std = STD / math.sqrt(2 * num_layers)  # residual outputs: GPT-2's scaling keeps the stream's size
    return rng.normal(0.0, std, shape).astype(np.float32)


def init_params(config: dict, seed: int = 0) -> dict[str, mx.array]:
    """Initial float32 parameters; each tensor draws from its own stream, so adding one changes no other."""
    shapes = param_shapes(config)
    layers = config["num_hidden_layers"]
    params = {}
    for name in sorted(shapes):
        rng = np.random.default_rng([seed, *name.encode()])  # seeded by (seed, name)
        params[name] = mx.array(init_value(name, shapes[name], rng, layers))
    return params
