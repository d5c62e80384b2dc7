"""Tiny random checkpoints written by mlx-lm itself (quantize_model + save_model + save_config).

mlx-lm is the reference: these directories are what its `convert` would write for a
model of each supported architecture, only small.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map_with_path

# Widths of 128 let every group size (32/64/128) quantize every linear layer.
_COMMON = dict(
    hidden_size=128, num_hidden_layers=4, intermediate_size=256, num_attention_heads=4,
    num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
    rms_norm_eps=1e-6, vocab_size=256, rope_theta=10000.0, max_position_embeddings=512,
    tie_word_embeddings=False,
)
_LINEAR_ATTENTION = dict(
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32,
    linear_value_head_dim=32, linear_conv_kernel_dim=4, full_attention_interval=4,
    shared_expert_intermediate_size=128, decoder_sparse_step=1, head_dim=32,
)
CONFIGS = {
    "qwen3_next": dict(
        _COMMON, **_LINEAR_ATTENTION, model_type="qwen3_next", mlp_only_layers=[],
        partial_rotary_factor=0.25, norm_topk_prob=True,
    ),
    "qwen3_moe": dict(
        _COMMON, model_type="qwen3_moe", head_dim=32, decoder_sparse_step=1, mlp_only_layers=[1],
        norm_topk_prob=True,
    ),
    "qwen2_moe": dict(_COMMON, model_type="qwen2_moe", shared_expert_intermediate_size=128),
    "qwen3_5_moe": dict(
        model_type="qwen3_5_moe",
        text_config=dict(
            _COMMON, **_LINEAR_ATTENTION, model_type="qwen3_5_moe_text",
            rope_parameters=dict(type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
        ),
    ),
}


def gates_at_8_bits(path: str, _module) -> dict | bool:
    """The routers at 8 bits, as mlx-lm's own predicates for these models do (qwen2_moe has none)."""
    if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
        return {"group_size": 64, "bits": 8}
    return True


def write_checkpoint(
    directory: Path, model_type: str, *, group_size=64, bits=4, predicate=None, seed=0, overrides=None,
    quantize=True,
) -> Path:
    """Build a random mlx-lm model of `model_type`, quantize it as mlx-lm does, save it to `directory`."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    config = json.loads(json.dumps(CONFIGS[model_type]))
    fields = config.get("text_config", config)
    fields.update(overrides or {})
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    cast = getattr(model, "cast_predicate", lambda _: True)  # as mlx-lm's convert: bf16, A_log kept
    model.update(tree_map_with_path(
        lambda k, v: v.astype(mx.bfloat16) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
        model.parameters(),
    ))
    predicate = predicate or getattr(model, "quant_predicate", None) or gates_at_8_bits
    if quantize:
        model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(directory, model)
    save_config(config, directory / "config.json")
    return directory
