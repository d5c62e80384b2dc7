"""flashmoe.tools.convert writes what mlx-lm writes: mlx-lm loads it and agrees with flashmoe."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from flashmoe import check_checkpoint
from flashmoe.analysis.parity import greedy_tokens, mlx_lm_cache, mlx_lm_model
from flashmoe.loader import load_model
from flashmoe.quant import QuantSpec
from flashmoe.tools.convert import main as convert_main
from tests.helpers import rel_err, write_checkpoint


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("float"), "qwen3_next", quantize=False)


@pytest.fixture(scope="module")
def converted(float_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlx")
    assert convert_main([str(float_checkpoint), str(out)]) == 0
    return out


def test_routers_at_8_bits_everything_else_at_4_in_both_sections(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    section = config["quantization"]
    assert (section["bits"], section["group_size"]) == (4, 64)
    entries = {k: v for k, v in section.items() if isinstance(v, dict)}
    assert entries and all(
        k.endswith(("mlp.gate", "shared_expert_gate")) and v["bits"] == 8 for k, v in entries.items()
    )
    plan, resolved = check_checkpoint(converted)
    assert {r.spec for m, r in resolved.items() if "switch_mlp" in m} == {QuantSpec(4, 64)}
    scales = mx.load(str(next(converted.glob("*.safetensors"))))
    assert all(v.dtype == mx.bfloat16 for k, v in scales.items() if k.endswith((".scales", ".biases")))


def test_mlx_lm_loads_the_conversion_and_agrees(converted, seed):
    ours, reference = load_model(converted, backend="mlx", dtype=mx.float32), mlx_lm_model(converted)
    tokens = mx.random.randint(0, 256, (1, 10))
    assert rel_err(ours(tokens), reference(tokens)) < 1e-3
    prompt = [5, 6, 7]
    assert greedy_tokens(ours, ours.make_cache, prompt, 16) == greedy_tokens(
        reference, mlx_lm_cache(reference), prompt, 16
    )


def test_overrides_make_variants(float_checkpoint, tmp_path):
    assert (
        convert_main(
            [
                str(float_checkpoint),
                str(tmp_path),
                "--override",
                "switch_mlp=2",
                "--override",
                "mlp.gate$=4",
                "--group-size",
                "32",
            ]
        )
        == 0
    )
    _, resolved = check_checkpoint(tmp_path)
    assert {r.spec for m, r in resolved.items() if "switch_mlp" in m} == {QuantSpec(2, 32)}
    assert resolved["model.layers.0.mlp.gate"].spec == QuantSpec(4, 32)
    assert resolved["model.layers.0.mlp.shared_expert_gate"].spec == QuantSpec(8, 32)


def test_converting_a_quantized_checkpoint_is_refused(converted, tmp_path, capsys):
    assert convert_main([str(converted), str(tmp_path)]) == 1
    assert "already quantized" in capsys.readouterr().err
