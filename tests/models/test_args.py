"""The feature rows: every architecture's differences stated once, as data, and the tensor list they imply."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import flashmoe
from flashmoe.models.args import ARCHS, ModelArgs, param_shapes
from flashmoe.safetensors import tensor_infos
from tests.helpers import CONFIGS, write_checkpoint

PACKAGE = Path(flashmoe.__file__).parent


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_param_shapes_list_exactly_what_mlx_lm_saves(model_type, tmp_path):
    """The one list of a model's tensors (synth and training use it) equals mlx-lm's own checkpoint."""
    directory = write_checkpoint(tmp_path / model_type, model_type, quantize=False)
    saved = {name: info.shape for name, info in tensor_infos(directory).items()}
    config = flashmoe.loader.read_config(directory)
    assert param_shapes(ModelArgs.from_config(config)) == saved


def test_no_model_code_asks_for_a_model_name():
    """Only the feature table (models/args.py) may compare model_type; everything else asks the row."""
    asks = re.compile(r"model_type\s*(==|!=|in\b|not in\b)")
    offenders = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "args.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if asks.search(line)
    ]
    assert offenders == []


def test_every_supported_architecture_has_a_row_and_a_tiny_checkpoint():
    assert set(ARCHS) == set(CONFIGS)


def test_an_unknown_model_type_is_refused_with_the_supported_list():
    with pytest.raises(flashmoe.FlashMoeError, match="qwen3_next"):
        ModelArgs.from_config({"model_type": "llama", "hidden_size": 8})


def test_rows_fill_defaults_the_config_leaves_out():
    base = dict(hidden_size=64, num_hidden_layers=4, vocab_size=32, num_attention_heads=4, num_experts=4)
    hybrid = ModelArgs.from_config({**base, "model_type": "qwen3_next"})
    assert hybrid.full_attention_interval == 4 and [hybrid.is_linear_attention(i) for i in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    wrapped = ModelArgs.from_config({"model_type": "qwen3_5_moe", "text_config": base})
    assert wrapped.norm_topk_prob is True and wrapped.is_moe(0)
    plain = ModelArgs.from_config({**base, "model_type": "qwen2_moe", "head_dim": 3})
    assert plain.head_dim == 16 and plain.norm_topk_prob is False  # head_dim from the hidden size
