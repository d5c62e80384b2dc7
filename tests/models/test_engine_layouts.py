"""The bug on demand (quant="global"), the Hugging Face expert layout, and refusals while loading."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from flashmoe.errors import FlashMoeError
from flashmoe.loader import load_model
from flashmoe.models.sanitize import ZERO_CENTRED_NORMS
from tests.helpers import CONFIGS, rel_err, write_checkpoint


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def test_global_quant_misreads_the_8_bit_gates_and_routes_to_other_experts(checkpoint, seed):
    fixed, buggy = (
        load_model(checkpoint, backend="mlx"),
        load_model(checkpoint, backend="mlx", quant="global"),
    )
    gates = sorted(m for m in buggy.report.misread_modules)
    assert gates and all(m.endswith(("mlp.gate", "mlp.shared_expert_gate")) for m in gates)
    assert fixed.report.misread_modules == []
    tokens = mx.random.randint(0, fixed.args.vocab_size, (1, 16))
    good_logits, bad_logits = fixed(tokens), buggy(tokens)
    good, bad = fixed.routing(), buggy.routing()
    for layer in fixed.moe_layers:
        same = mx.sort(good[layer].experts, axis=-1) == mx.sort(bad[layer].experts, axis=-1)
        assert not mx.all(same).item(), f"layer {layer}: the misread router chose the same experts"
    assert rel_err(bad_logits, good_logits) > 0.1


def as_hugging_face(name: str, value: mx.array, model_type: str) -> dict[str, mx.array]:
    """One mlx-lm tensor in the raw Hugging Face layout: experts unstacked, conv (C, 1, k),
    zero-centred norms (Qwen3-Next family), qwen3_5_moe's model.language_model prefix."""
    if model_type == "qwen3_5_moe":
        name = name.replace("language_model.model.", "model.language_model.").replace(
            "language_model.lm_head", "lm_head"
        )
    if model_type in ("qwen3_next", "qwen3_5_moe"):
        if name.endswith(ZERO_CENTRED_NORMS):
            value = value - 1.0
        if name.endswith("conv1d.weight"):
            value = value.moveaxis(1, 2)
    if ".switch_mlp." not in name:
        return {name: value}
    prefix, rest = name.split(".switch_mlp.")
    return {f"{prefix}.experts.{e}.{rest}": value[e] for e in range(value.shape[0])}


def test_hugging_face_layout_loads_to_the_same_model(checkpoint, tmp_path, seed):
    model_type = json.loads((checkpoint / "config.json").read_text())["model_type"]
    hf = {}
    for name, value in mx.load(str(checkpoint / "model.safetensors")).items():
        hf.update(as_hugging_face(name, value.astype(mx.float32) if "norm" in name else value, model_type))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), hf)
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    tokens = mx.random.randint(0, 200, (1, 6))
    err = rel_err(load_model(tmp_path, backend="mlx")(tokens), load_model(checkpoint, backend="mlx")(tokens))
    assert err < 1e-6, f"rel err {err:.3g} (seed {seed})"


def copy_with(checkpoint, directory, edit):
    """A copy of `checkpoint` in `directory` whose tensors are `edit(tensors)`."""
    (directory / "config.json").write_text((checkpoint / "config.json").read_text())
    mx.save_safetensors(
        str(directory / "model.safetensors"), edit(mx.load(str(checkpoint / "model.safetensors")))
    )
    return directory


def test_unused_and_missing_tensors_are_named(checkpoint, tmp_path):
    copy_with(checkpoint, tmp_path, lambda w: {**w, "model.extra.weight": mx.zeros((2, 2))})
    with pytest.raises(FlashMoeError, match="model.extra.weight"):
        load_model(tmp_path)
    norm = next(k for k in mx.load(str(checkpoint / "model.safetensors")) if k.endswith("model.norm.weight"))
    copy_with(checkpoint, tmp_path, lambda w: {k: v for k, v in w.items() if k != norm})
    with pytest.raises(FlashMoeError, match=f"'{norm}' is missing"):
        load_model(tmp_path)


def test_mtp_tensors_are_dropped_with_a_warning(checkpoint, tmp_path):
    copy_with(checkpoint, tmp_path, lambda w: {**w, "mtp.fc.weight": mx.zeros((2, 2))})
    with pytest.warns(UserWarning, match="mtp"):
        load_model(tmp_path)


def test_unknown_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FlashMoeError, match="qwen3_next"):
        load_model(tmp_path)


def test_fewer_experts_per_token_on_request(checkpoint, seed):
    default, fewer = (
        load_model(checkpoint, backend="mlx"),
        load_model(checkpoint, backend="mlx", k=1),
    )
    tokens = mx.random.randint(0, default.args.vocab_size, (1, 5))
    assert rel_err(fewer(tokens), default(tokens)) > 1e-3
    for routing in fewer.routing().values():
        assert routing.experts.shape == (1, 5, 1)
        # One expert: renormalised its weight is 1, otherwise it is its softmax probability (< 1).
        assert mx.all(routing.weights == 1.0).item() == fewer.args.norm_topk_prob
    with pytest.raises(FlashMoeError, match="experts per token must be in 1..8"):
        load_model(checkpoint, k=9)
