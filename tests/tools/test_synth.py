"""Synthetic checkpoints: mlx-lm's names and shapes at real widths, loadable by both engines, hot experts."""

from __future__ import annotations

import importlib
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flashmoe.analysis.parity import mlx_lm_model
from flashmoe.loader import load, load_model
from flashmoe.tools.synth import PRESETS, global_plan, layer_plan, synth_config, write_synthetic
from tests.helpers import rel_err

SMALL = dict(
    hidden_size=256,
    num_experts=128,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
    vocab_size=1024,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
)


def mlx_lm_shapes(config: dict) -> dict[str, tuple]:
    """Parameter shapes of mlx-lm's model for `config`, quantized as its convert would (never evaluated)."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    section = config["quantization"]
    nn.quantize(
        model,
        group_size=64,
        bits=4,
        class_predicate=lambda path, m: hasattr(m, "to_quantized") and section.get(path, True),
    )
    return {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tensor_names_and_shapes_match_mlx_lm_at_real_width(preset):
    config = synth_config(preset, layers=4)  # 4 layers: linear and full attention for qwen3_next
    plan = global_plan(config) + [item for i in range(4) for item in layer_plan(config, i)]
    ours = {name: tuple(shape) for item in plan for name, _, shape in item.entries()}
    assert ours == mlx_lm_shapes(config)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_quantization_section_has_8_bit_gates_in_both_copies(preset):
    config = synth_config(preset, layers=2)
    assert config["quantization"] == config["quantization_config"]
    assert config["quantization"]["model.layers.1.mlp.gate"] == {"group_size": 64, "bits": 8}
    assert ("model.layers.1.mlp.shared_expert_gate" in config["quantization"]) == (
        preset == "qwen3-coder-next"
    )


@pytest.fixture(scope="module", params=sorted(PRESETS))
def small(request, tmp_path_factory):
    overrides = {k: v for k, v in SMALL.items() if k in PRESETS[request.param]}  # narrower, same structure
    return write_synthetic(
        request.param,
        tmp_path_factory.mktemp(request.param),
        layers=4,
        overrides=overrides,
        log=lambda *_: None,
    )


def test_small_synthetic_runs_the_same_in_mlx_lm_and_flashmoe(small):
    tokens = mx.random.randint(0, SMALL["vocab_size"], (1, 32))
    reference = mlx_lm_model(small)(tokens)
    assert rel_err(load_model(small, dtype=mx.float32)(tokens), reference) < 1e-3
    assert rel_err(load_model(small, dtype=mx.float32, stream_experts=True)(tokens), reference) < 1e-3


def test_routers_have_hot_experts(small):
    model = load_model(small)
    model(mx.random.randint(0, SMALL["vocab_size"], (1, 256)))
    k, experts = model.args.num_experts_per_tok, model.args.num_experts
    for layer, routing in model.routing().items():
        # share of the tokens choosing each expert
        share = np.bincount(np.array(routing.experts).ravel(), minlength=experts) / 256
        assert share.max() > 2 * k / experts, f"layer {layer}: no hot expert ({share.max():.2f})"


def test_tokenizer_round_trips_and_ids_fit_the_vocab(small):
    _, tokenizer = load(small)
    ids = tokenizer.encode("def fibonacci(n):")
    assert ids and max(ids) < SMALL["vocab_size"] and tokenizer.decode(ids) == "def fibonacci(n):"
    assert json.loads((small / "config.json").read_text())["eos_token_id"] in tokenizer.eos_token_ids
