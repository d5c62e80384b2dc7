"""Property tests of quant.resolve over generated configs, plus its refusals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmoe import quant
from flashmoe.errors import QuantConfigError, QuantMismatchError
from flashmoe.quant import QuantSpec, TensorInfo

affine = st.builds(
    lambda b, g: {"bits": b, "group_size": g},
    st.sampled_from(quant.AFFINE_BITS),
    st.sampled_from(quant.AFFINE_GROUP_SIZES),
)
fp = st.sampled_from([{"mode": m, "bits": b, "group_size": g} for m, (b, g) in quant.FP_FORMATS.items()])
entry = st.one_of(affine, fp, st.booleans())
module = st.builds(
    lambda prefix, layer, leaf: f"{prefix}model.layers.{layer}.{leaf}",
    st.sampled_from(["", "language_model."]),
    st.integers(0, 60),
    st.sampled_from(["mlp.gate", "mlp.shared_expert_gate", "mlp.switch_mlp.up_proj", "self_attn.q_proj"]),
)


def expected_spec(value, default: dict) -> QuantSpec | None:
    """What an entry means, written from the format's description (not from resolve)."""
    if value is False:
        return None
    settings = default if value is True else value
    return QuantSpec(settings["bits"], settings["group_size"], settings.get("mode", "affine"))


@settings(max_examples=200, deadline=None)
@given(
    default=affine,
    entries=st.dictionaries(module, entry, max_size=8),
    probe=module,
    section_key=st.sampled_from(quant.SECTION_KEYS),
    nested=st.booleans(),
    both=st.booleans(),
)
def test_resolve_matches_the_format(default, entries, probe, section_key, nested, both):
    section = {**default, **entries}
    keys = quant.SECTION_KEYS if both else (section_key,)
    body = {key: dict(section) for key in keys}
    config = {"model_type": "x", "text_config": body} if nested else {"model_type": "x", **body}
    plan = quant.resolve(config)
    assert plan.default == expected_spec(True, default)
    for path, value in entries.items():
        assert plan.spec_for(path) == expected_spec(value, default)
    if probe not in entries:
        assert plan.spec_for(probe) == plan.default
    assert plan.section == ("text_config." if nested else "") + keys[0]


def test_quantization_is_read_before_quantization_config_and_top_level_before_text_config():
    config = {
        "quantization_config": {"bits": 4, "group_size": 64},
        "text_config": {"quantization": {"bits": 8, "group_size": 32}},
    }
    assert quant.resolve(config).default == QuantSpec(4, 64)
    assert quant.resolve({"text_config": config["text_config"]}).default == QuantSpec(8, 32)


def test_an_unquantized_config_resolves_to_nothing():
    plan = quant.resolve({"model_type": "qwen3_moe"})
    assert plan.default is None and plan.spec_for("model.layers.0.mlp.gate") is None


def test_missing_mode_means_affine_and_missing_values_take_the_mode_defaults():
    plan = quant.resolve(
        {"quantization": {"bits": 4, "group_size": 64, "a": {"bits": 8}, "b": {"mode": "mxfp4"}}}
    )
    assert plan.spec_for("a") == QuantSpec(8, 64, "affine")
    assert plan.spec_for("b") == QuantSpec(4, 32, "mxfp4")


@pytest.mark.parametrize(
    "section,match",
    [
        ({"bits": 7, "group_size": 64}, "affine bits must be one of"),
        ({"bits": 4, "group_size": 48}, "group_size must be one of"),
        ({"bits": 4, "group_size": 64, "mode": "int4"}, "unknown quantization mode 'int4'"),
        ({"bits": 8, "group_size": 32, "mode": "mxfp4"}, "mxfp4 is always 4 bits"),
        ({"bits": 4, "group_size": 128, "quant_method": "gptq"}, "quant_method='gptq'"),
        (
            {"bits": 4, "group_size": 64, "m": {"mode": "nvfp4", "global_scale": True}},
            "global nvfp4 scale",
        ),
    ],
)
def test_unreadable_sections_are_refused_by_name(section, match):
    with pytest.raises(QuantConfigError, match=match):
        quant.resolve({"quantization": section})


def test_two_copies_that_disagree_are_refused():
    config = {
        "quantization": {"bits": 4, "group_size": 64},
        "quantization_config": {"bits": 8, "group_size": 64},
    }
    with pytest.raises(QuantConfigError, match="disagree"):
        quant.resolve(config)


def infos(out_dim, in_dim, bits, group_size, *, fp_scales=False, biases=True, file="m.safetensors"):
    scales = (out_dim, in_dim // group_size)
    tensors = {
        "m.weight": TensorInfo((out_dim, in_dim * bits // 32), "U32", file),
        "m.scales": TensorInfo(scales, "U8" if fp_scales else "BF16", file),
    }
    if biases:
        tensors["m.biases"] = TensorInfo(scales, "BF16", file)
    return tensors


@settings(max_examples=100, deadline=None)
@given(
    stored=affine,
    claimed=affine,
    out_dim=st.integers(1, 64),
    in_groups=st.integers(1, 16),
    explicit=st.booleans(),
)
def test_the_shape_check_accepts_the_truth_and_refuses_explicit_lies(
    stored, claimed, out_dim, in_groups, explicit
):
    in_dim = in_groups * 128
    tensors = infos(out_dim, in_dim, stored["bits"], stored["group_size"])
    section = {**claimed, "m": dict(claimed)} if explicit else dict(claimed)
    plan = quant.resolve({"quantization": section})
    truth = QuantSpec(stored["bits"], stored["group_size"])
    claim = QuantSpec(claimed["bits"], claimed["group_size"])
    # Without in_dim, shapes fix only bits * group_size: (4-bit, g64) and (8-bit, g32) look alike.
    same_shapes = claim.bits * claim.group_size == truth.bits * truth.group_size
    if explicit and not same_shapes:
        with pytest.raises(QuantMismatchError, match=r"'m.weight'.*configured"):
            quant.check_tensors(plan, tensors)
        return
    resolved = quant.check_tensors(plan, tensors)["m"]
    if same_shapes:
        assert resolved.spec == claim
    else:  # unmentioned: from shapes, trying the top level's group size first
        scaled = truth.bits * truth.group_size  # = bits * group_size for any reading of these shapes
        bits = scaled // claim.group_size if scaled % claim.group_size == 0 else None
        assert resolved.source.startswith("shapes")
        assert resolved.spec.bits * resolved.spec.group_size == truth.bits * truth.group_size
        if bits in quant.AFFINE_BITS:
            assert resolved.spec == QuantSpec(bits, claim.group_size)


def test_fp_format_tensors_check_their_scales_and_biases():
    plan = quant.resolve({"quantization": {"bits": 4, "group_size": 32, "mode": "mxfp4"}})
    ok = infos(8, 256, 4, 32, fp_scales=True, biases=False)
    assert quant.check_tensors(plan, ok)["m"].spec == QuantSpec(4, 32, "mxfp4")
    with pytest.raises(QuantMismatchError, match="has no biases"):
        quant.check_tensors(plan, infos(8, 256, 4, 32, fp_scales=True, biases=True))


def test_missing_weight_and_disabled_module_with_scales_are_named():
    tensors = infos(8, 256, 4, 64)
    plan = quant.resolve({"quantization": {"bits": 4, "group_size": 64, "m": False}})
    with pytest.raises(QuantMismatchError, match="says 'm' is not quantized"):
        quant.check_tensors(plan, tensors)
    del tensors["m.weight"]
    with pytest.raises(QuantMismatchError, match="'m.weight' is missing"):
        quant.check_tensors(quant.resolve({"quantization": {"bits": 4, "group_size": 64}}), tensors)


def test_a_quantized_module_with_the_wrong_dtypes_is_refused_naming_the_tensor():
    """Two tensors' header entries swapped pass every shape check; their dtypes do not."""
    plan = quant.resolve({"quantization": {"group_size": 64, "bits": 4}})
    tensors = {
        "m.weight": quant.TensorInfo((8, 16), "F32", "shard.safetensors"),  # should be U32 words
        "m.scales": quant.TensorInfo((8, 2), "BF16", "shard.safetensors"),
        "m.biases": quant.TensorInfo((8, 2), "U32", "shard.safetensors"),  # should be a float
    }
    with pytest.raises(
        QuantMismatchError, match=r"shard\.safetensors: 'm\.weight' is F32.*'m\.biases' is U32"
    ):
        quant.check_tensors(plan, tensors)
