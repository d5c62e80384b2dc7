"""The claims notebooks 01 and 02 make, asserted on the bundled model."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import flashmoe
from flashmoe.analysis import routing
from flashmoe.errors import QuantMismatchError
from flashmoe.loader import default_model_dir

PROMPT = "def parse(line):\n    parts = line.split(',')\n    return parts[0]\n"


@pytest.fixture(scope="module")
def models():
    # float32 on any device: the exact comparisons below are of float32 router logits
    good, tokenizer = flashmoe.load(None, dtype=mx.float32)
    bad, _ = flashmoe.load(None, quant="global", dtype=mx.float32)
    return good, bad, mx.array([tokenizer.encode(PROMPT)])


@pytest.fixture(scope="module")
def comparison(models):
    good, bad, tokens = models
    return routing.compare_routing(good, bad, tokens)


def test_the_corrupted_router_disagrees_with_the_true_one_in_every_moe_layer(models, comparison):
    good, _, tokens = models
    assert sorted(comparison.layers) == good.moe_layers
    for layer, c in comparison.layers.items():
        assert c.overlap.shape == (tokens.size,)
        assert c.overlap.mean() < 0.5, f"layer {layer}: overlap {c.overlap.mean():.2f}"
    assert comparison.overlap_matrix().shape == (len(good.moe_layers), tokens.size)


def test_the_misread_gate_scores_have_another_rms_and_random_signs(comparison):
    for layer, c in comparison.layers.items():
        assert abs(c.rms_bad - c.rms_true) > 0.1 * c.rms_true, (
            f"layer {layer}: {c.rms_bad:.2f} vs {c.rms_true:.2f}"
        )
        assert 0.3 < c.sign_agreement < 0.7, f"layer {layer}: sign agreement {c.sign_agreement:.2f}"


def test_a_model_compared_with_itself_agrees_everywhere(models):
    good, _, tokens = models
    same = routing.compare_routing(good, good, tokens)
    for c in same.layers.values():
        assert (c.overlap == 1).all() and c.sign_agreement == 1 and c.rms_bad == c.rms_true


def test_routing_at_gives_k_experts_with_weights_both_ways(models, comparison):
    good, _, _ = models
    k = good.layers[good.moe_layers[0]].mlp.k
    picked = comparison.routing_at(good.moe_layers[0], 0)
    assert len(picked["true"]) == len(picked["bad"]) == k
    assert sum(w for _, w in picked["true"]) == pytest.approx(1.0, abs=1e-4)  # norm_topk_prob


def test_the_fixed_router_agrees_exactly_with_an_independent_dequantize_reference(models):
    good, bad, tokens = models
    ref = routing.reference_routing(good, default_model_dir(), tokens)
    good(tokens)
    chosen, decisions = routing.chosen_experts(good), good.routing()
    for layer in good.moe_layers:
        assert ref.bits[layer] == 8
        np.testing.assert_allclose(
            np.array(decisions[layer].logits), np.array(ref.logits[layer]), rtol=1e-4, atol=1e-4
        )
        assert (chosen[layer] == ref.experts[layer]).all(), f"layer {layer}"
    bad(tokens)
    misread = routing.chosen_experts(bad)
    assert all((misread[layer] != ref.experts[layer]).any() for layer in good.moe_layers)


def test_recording_gate_inputs_restores_the_gates(models):
    good, _, tokens = models
    gates = [good.layers[i].mlp.gate for i in good.moe_layers]
    with routing.recording_gate_inputs(good) as inputs:
        good(tokens)
    assert sorted(inputs) == good.moe_layers and inputs[good.moe_layers[0]].shape[:2] == tokens.shape
    assert [good.layers[i].mlp.gate for i in good.moe_layers] == gates


def test_gate_shapes_imply_8_bits_as_the_config_says():
    rows = routing.gate_tensor_table(default_model_dir())
    assert rows and all(r.implied_bits == 8 and r.config_bits == 8 for r in rows)
    assert all(r.in_dim == r.scales_shape[-1] * r.group_size for r in rows)
    assert all(r.implied_bits == r.weight_shape[-1] * 32 / r.in_dim for r in rows)


def test_a_config_that_claims_4_bits_for_an_8_bit_gate_is_refused(tmp_path):
    directory = routing.lying_copy(default_model_dir(), tmp_path / "liar", "model.layers.3.mlp.gate", bits=4)
    with pytest.raises(
        QuantMismatchError, match=r"model\.layers\.3\.mlp\.gate.*configured 4 bits.*imply 8 bits"
    ):
        flashmoe.load(directory)
    flashmoe.load(default_model_dir())  # the original is untouched
