"""Resolution and the shape check on checkpoints written by mlx-lm itself, for every architecture."""

from __future__ import annotations

import json

import pytest

from flashmoe import check_checkpoint, quant
from flashmoe.errors import QuantMismatchError
from tests.helpers import CONFIGS, write_checkpoint

ROUTERS = ("mlp.gate", "mlp.shared_expert_gate")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    model_type = request.param
    return model_type, write_checkpoint(tmp_path_factory.mktemp(model_type), model_type)


def test_routers_resolve_to_8_bits_and_the_rest_to_4(checkpoint):
    model_type, directory = checkpoint
    plan, resolved = check_checkpoint(directory)
    assert plan.default == quant.QuantSpec(4, 64)
    routers = [m for m in resolved if m.endswith(ROUTERS)]
    layers = CONFIGS[model_type].get("text_config", CONFIGS[model_type])["num_hidden_layers"]
    assert len(routers) >= layers - 1  # qwen3_moe keeps one dense layer
    for module, r in resolved.items():
        expected = 8 if module.endswith(ROUTERS) else 4
        assert r.spec.bits == expected, f"{module}: {r}"
        assert plan.spec_for(module).bits == expected


def test_module_paths_are_the_configs_own(checkpoint):
    model_type, directory = checkpoint
    plan, _ = check_checkpoint(directory)
    prefix = "language_model.model.layers." if model_type == "qwen3_5_moe" else "model.layers."
    assert all(key.startswith(prefix) for key in plan.entries)
    assert plan.spec_for(prefix + "0.mlp.gate") == quant.QuantSpec(8, 64, "affine")


def test_a_config_that_claims_4_bits_for_an_8_bit_gate_is_refused(checkpoint):
    model_type, directory = checkpoint
    config_path = directory / "config.json"
    original = config_path.read_text()
    config = json.loads(original)
    section = config.get("text_config", config) if "quantization" not in config else config
    gate = next(k for k in section["quantization"] if k.endswith("layers.0.mlp.gate"))
    for key in quant.SECTION_KEYS:
        section[key][gate] = {"group_size": 64, "bits": 4}
    config_path.write_text(json.dumps(config))
    try:
        with pytest.raises(QuantMismatchError) as err:
            check_checkpoint(directory)
    finally:
        config_path.write_text(original)
    message = str(err.value)
    assert f"'{gate}.weight'" in message and "configured 4 bits" in message
    assert "imply 8 bits" in message and ".safetensors" in message


@pytest.mark.parametrize("group_size,bits", [(32, 4), (128, 2), (64, 8)])
def test_group_sizes_and_bits_resolve_from_mlx_lm_configs(group_size, bits, tmp_path):
    directory = write_checkpoint(tmp_path, "qwen3_moe", group_size=group_size, bits=bits)
    plan, resolved = check_checkpoint(directory)
    assert plan.default == quant.QuantSpec(bits, group_size)
    experts = [r for m, r in resolved.items() if "switch_mlp" in m]
    assert experts and all(r.spec == quant.QuantSpec(bits, group_size) for r in experts)


def test_unmentioned_tensor_stored_at_other_bits_gets_its_spec_from_shapes(tmp_path):
    """2-bit experts under a config whose top level says 4: the shapes decide, and say so."""

    def predicate(path, module):
        return {"group_size": 64, "bits": 8} if path.endswith("mlp.gate") else True

    directory = write_checkpoint(tmp_path, "qwen3_moe", bits=2, predicate=predicate)
    config = json.loads((directory / "config.json").read_text())
    for key in quant.SECTION_KEYS:
        config[key]["bits"] = 4  # the top level now lies; no module entry names the experts
    (directory / "config.json").write_text(json.dumps(config))
    _, resolved = check_checkpoint(directory)
    expert = resolved["model.layers.0.mlp.switch_mlp.gate_proj"]
    assert expert.spec == quant.QuantSpec(2, 64)
    assert expert.source.startswith("shapes") and "4-bit" in expert.source
