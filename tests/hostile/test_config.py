"""config.json validation: each bad value is a FlashMoeError naming its key."""

from __future__ import annotations

import json
import shutil

import pytest

from flashmoe.errors import FlashMoeError
from flashmoe.loader import default_model_dir, load_model, read_config
from flashmoe.models.args import ModelArgs


@pytest.fixture(scope="module")
def config() -> dict:
    return read_config(default_model_dir())


@pytest.mark.parametrize(
    "key,value",
    [
        ("hidden_size", 0),
        ("hidden_size", -256),
        ("hidden_size", "256"),
        ("hidden_size", 256.0),
        ("hidden_size", True),
        ("hidden_size", 2**70),
        ("num_hidden_layers", 0),
        ("num_hidden_layers", 10**9),
        ("vocab_size", 0),
        ("num_attention_heads", 0),
        ("num_key_value_heads", -1),
        ("num_key_value_heads", 3),
        ("head_dim", -64),
        ("num_experts", -1),
        ("num_experts_per_tok", 0),
        ("num_experts_per_tok", 33),
        ("moe_intermediate_size", -1),
        ("decoder_sparse_step", 0),
        ("rms_norm_eps", 0),
        ("rms_norm_eps", float("nan")),
        ("rms_norm_eps", -1e-6),
        ("rope_theta", 0),
        ("rope_theta", float("inf")),
        ("rope_theta", "big"),
        ("partial_rotary_factor", 0),
        ("partial_rotary_factor", 2.0),
        ("mlp_only_layers", "0"),
        ("mlp_only_layers", [-1]),
        ("tie_word_embeddings", "yes"),
        ("norm_topk_prob", 1),
        ("linear_conv_kernel_dim", 0),
        ("linear_num_value_heads", 3),
        ("full_attention_interval", -4),
        ("rope_scaling", "linear"),
    ],
)
def test_bad_values_name_the_key(config, key, value):
    with pytest.raises(FlashMoeError, match=f"config.json: .*{key}"):
        ModelArgs.from_config({**config, key: value})


def test_the_bundled_config_is_accepted(config):
    args = ModelArgs.from_config(config)
    assert args.num_experts == 32 and args.num_experts_per_tok == 4


def test_qwen2_hidden_size_must_divide_into_heads():
    base = dict(
        model_type="qwen2_moe",
        hidden_size=100,
        num_hidden_layers=2,
        vocab_size=32,
        num_attention_heads=3,
        num_key_value_heads=1,
    )
    with pytest.raises(FlashMoeError, match="hidden_size = 100 is not divisible by num_attention_heads = 3"):
        ModelArgs.from_config(base)


@pytest.mark.parametrize(
    "text,words",
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1]", "expected a JSON object"),
        (b"{", "not valid JSON"),
        (b"[" * 100000, "not valid JSON"),
        (b'{"model_type": "llama"}', "model_type 'llama'"),
    ],
)
def test_unreadable_config_files_through_the_loader(tmp_path, text, words):
    folder = tmp_path / "m"
    shutil.copytree(default_model_dir(), folder)
    (folder / "config.json").write_bytes(text)
    with pytest.raises(FlashMoeError, match="config.json") as info:
        load_model(folder)
    assert words in str(info.value)


def test_a_config_that_is_a_directory(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(FlashMoeError, match="config.json: not a regular file"):
        read_config(tmp_path)


def test_a_wrong_value_through_the_loader_names_the_key(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(default_model_dir(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_experts_per_tok"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        FlashMoeError,
        match="num_experts_per_tok = 64; expected an integer in \\[1, num_experts=32\\]",
    ):
        load_model(folder)
