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

from flashmoe.models.args import ModelArgs
from flashmoe.models.args import param_shapes as model_param_shapes

STD = 0.02  # projections and embeddings (GPT-2's choice)


def param_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor flashmoe's Model takes for this qwen3_next config."""
    args = ModelArgs.from_config(config)
    if not args.arch.hybrid:
        raise ValueError(
            f"training builds hybrid (Gated DeltaNet) models, found model_type {args.model_type!r}"
        )
    return model_param_shapes(args)


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
