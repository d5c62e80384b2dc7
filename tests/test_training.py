"""The training pipeline (training/): tokenizer, corpus split, initial parameters, steps, exact resume, shards.

A tiny qwen3_next config (2 layers: one Gated DeltaNet, one full attention; 4 experts) and
synthetic token files keep every test on the CPU and fast; the committed tokenizer is used
where one is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.models.args import ModelArgs
from tests.helpers import rel_err
from training import checkpoint
from training.corpus import ASSETS_DIR, EOS, build, collect_files, split
from training.init import init_params, param_shapes
from training.model_config import CONFIG, config
from training.objective import build_model, check_params
from training.tokenizer import train_tokenizer
from training.train import Settings, make_optimizer, make_step, train

TINY = config(
    hidden_size=64,
    num_hidden_layers=2,
    full_attention_interval=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    linear_num_key_heads=1,
    linear_key_head_dim=32,
    linear_num_value_heads=2,
    linear_value_head_dim=32,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
)
TINY_SETTINGS = Settings(batch=4, seq=32, total_steps=50, warmup=2, eval_tokens=256, compile=False)
SOURCE = '''# -*- coding: utf-8 -*-
"""Döcstring with ünïcode, a tab\there, and an emoji 🐍."""

class Spam(object):
\tdef eggs(self, x: int = 0x1F) -> "Spam":
        return {"k": [x ** 2 for x in range(10) if x % 3], 'é': r"\\d+"}\r\n
'''


@pytest.fixture(scope="module", autouse=True)
def on_the_cpu():
    """Every test here on the CPU, as the module says, on any machine: exact resume needs run-to-run
    identical arithmetic, which a GPU's backward pass does not give (H200: resumed weights differ
    from straight-through ones in the last bits)."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """train.bin / heldout.bin of seeded random ids, as training.corpus writes them."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, size in (("train", 20_000), ("heldout", 2_000)):
        rng.integers(0, TINY["vocab_size"], size, dtype=np.uint16).tofile(folder / f"{name}.bin")
    (folder / "manifest.json").write_text(json.dumps({"train": {"sha256": "synthetic"}, "heldout": {}}))
    return folder


def test_tokenizer_round_trips_python_source():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(ASSETS_DIR / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 2048 and tokenizer.token_to_id(EOS) == 0
    texts = [SOURCE, Path(json.__file__).read_text(), "", " ", "\n\n\t  \n", "\x00\x7f\u2028"]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert len(tokenizer.encode(texts[1]).ids) < len(texts[1]) / 2.5  # it learned Python, not just bytes
    config = json.loads((ASSETS_DIR / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOS


def test_tokenizer_training_is_deterministic():
    texts = [SOURCE * 3, Path(json.__file__).read_text()]
    a, b = train_tokenizer(texts, vocab_size=320), train_tokenizer(texts, vocab_size=320)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 320
    assert a.decode(a.encode(SOURCE).ids) == SOURCE


def test_corpus_split_keeps_whole_files_on_one_side(tmp_path):
    root = tmp_path / "lib"
    files = {f"pkg{i // 5}/mod{i}.py": f"x = {i}\nprint('file {i}')\n" for i in range(30)}
    files.update({"test/test_skip.py": "skip", "pkg0/tests/t.py": "skip", "_sysconfigdata__x.py": "skip"})
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    found = collect_files(root)
    assert found == sorted(f for f in files if "skip" not in files[f])
    train, heldout = split(found, 0.3)
    assert heldout and train and not set(train) & set(heldout) and sorted(train + heldout) == found
    assert split(found, 0.3) == (train, heldout)  # fixed by the paths alone

    m = build(tmp_path / "data", ASSETS_DIR, root, fraction=0.3, heldout_list=tmp_path / "heldout.txt")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(ASSETS_DIR / "tokenizer.json"))
    for name, names in (("train", train), ("heldout", heldout)):
        ids = np.fromfile(tmp_path / "data" / f"{name}.bin", dtype=np.uint16)
        assert ids.size == m[name]["tokens"] and list(m[name]["files"]) == names
        docs = tokenizer.decode(ids.tolist(), skip_special_tokens=False).split(EOS)
        assert docs[0] == "" and docs[1:] == [files[f] for f in names]  # each file whole, EOS before each
    assert (tmp_path / "heldout.txt").read_text().split() == heldout


def test_initial_parameters_build_a_flashmoe_model():
    params = init_params(TINY, seed=0)
    args = ModelArgs.from_config(TINY)
    check_params(params, args)  # every tensor taken, none missing
    logits = build_model(params, args)(mx.array([[0, 5, 17, 3, 9]]))
    assert logits.shape == (1, 5, TINY["vocab_size"]) and bool(mx.all(mx.isfinite(logits)))
    again = init_params(TINY, seed=0)
    assert all(mx.array_equal(params[k], again[k]) for k in params)
    other = init_params(TINY, seed=1)
    assert not mx.array_equal(other["model.embed_tokens.weight"], params["model.embed_tokens.weight"])
    assert set(param_shapes(CONFIG)) >= {
        "model.layers.0.linear_attn.in_proj_qkvz.weight",
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.0.mlp.shared_expert_gate.weight",
    }


def test_training_steps_lower_the_loss_on_a_repeated_batch():
    args = ModelArgs.from_config(TINY)
    opt = make_optimizer(TINY_SETTINGS)
    step = make_step(args, TINY_SETTINGS, opt)
    params = init_params(TINY, seed=0)
    state = opt.init(params)
    tokens = mx.array(np.random.default_rng(0).integers(0, TINY["vocab_size"], (4, 33)), dtype=mx.int32)
    losses = []
    for _ in range(6):
        params, state, metrics = step(params, state, tokens, mx.array(1e-2))
        losses.append(metrics[0].item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert 0.9 < metrics[1].item() < 4.0  # the balance loss is about 1 while routing is spread out


def test_resume_continues_exactly(tmp_path, data_dir):
    common = {"data_dir": data_dir, "minutes": 0, "log_every": 1}
    train(
        tmp_path / "straight",
        settings=TINY_SETTINGS,
        config=TINY,
        max_steps=4,
        evaluate_at_end=False,
        **common,
    )
    train(tmp_path / "chunked", settings=TINY_SETTINGS, config=TINY, max_steps=2, **common)
    with pytest.raises(FileExistsError):  # a fresh run never overwrites a checkpoint
        train(tmp_path / "chunked", settings=TINY_SETTINGS, config=TINY, max_steps=1, **common)
    state = train(tmp_path / "chunked", resume=True, max_steps=2, **common)
    assert (state["step"], state["chunks"], state["position"]) == (4, 2, 4)
    (pa, oa, _), (pb, ob, _) = (
        checkpoint.load(tmp_path / "straight"),
        checkpoint.load(tmp_path / "chunked"),
    )
    assert set(pa) == set(pb)
    for name in pa:
        assert mx.array_equal(pa[name], pb[name]), name
        assert mx.array_equal(oa["m"][name], ob["m"][name]) and mx.array_equal(
            oa["v"][name], ob["v"][name]
        ), name
    assert oa["step"].item() == ob["step"].item() == 4
    log = [json.loads(line) for line in (tmp_path / "chunked" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if r.get("event") == "eval"] == [2, 4]


def test_checkpoint_is_a_flashmoe_model(tmp_path, data_dir):
    from flashmoe.loader import load_model

    train(
        tmp_path / "run",
        settings=TINY_SETTINGS,
        config=TINY,
        data_dir=data_dir,
        minutes=0,
        max_steps=1,
        evaluate_at_end=False,
    )
    params = checkpoint.load(tmp_path / "run")[0]
    tokens = mx.array([[1, 2, 3, 4]])
    expected = build_model(params, ModelArgs.from_config(TINY))(tokens)  # backend mlx: training's ops
    assert mx.array_equal(load_model(tmp_path / "run", backend="mlx")(tokens), expected)
    # the default backend on a CPU (native) runs the Gated DeltaNet recurrence in its own kernel: the
    # same float32 math summed in another order
    assert rel_err(load_model(tmp_path / "run")(tokens), expected) < 1e-5


def test_shards_stay_under_the_limit(tmp_path):
    assert checkpoint.MAX_SHARD_BYTES < 16 * 2**20
    tensors = {f"t{i}": mx.full((64, 1024), i, mx.float32) for i in range(10)}  # 256 KiB each
    weight_map = checkpoint.save_shards(tensors, tmp_path, "model", max_bytes=600 * 2**10)
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) == 5 and set(weight_map.values()) == {f.name for f in files}
    assert all(f.stat().st_size < 600 * 2**10 + 4096 for f in files)  # + the header
    loaded = checkpoint.load_shards(tmp_path, "model")
    assert all(mx.array_equal(loaded[k], v) for k, v in tensors.items())
    biggest = max(int(np.prod(s)) * 4 for s in param_shapes(CONFIG).values())
    assert biggest < checkpoint.MAX_SHARD_BYTES  # every tensor of the real model fits a shard


@pytest.mark.slow
def test_compiled_resume_continues_exactly(tmp_path, data_dir):
    """The GPU runs compile the step: chunks must still add up exactly (the first compile takes ~30 s on CPU)."""
    settings = Settings(**{**TINY_SETTINGS.__dict__, "compile": True})
    common = {"data_dir": data_dir, "minutes": 0, "evaluate_at_end": False}
    train(tmp_path / "straight", settings=settings, config=TINY, max_steps=3, **common)
    train(tmp_path / "chunked", settings=settings, config=TINY, max_steps=1, **common)
    train(tmp_path / "chunked", resume=True, max_steps=2, **common)
    pa, pb = checkpoint.load(tmp_path / "straight")[0], checkpoint.load(tmp_path / "chunked")[0]
    assert all(mx.array_equal(pa[k], pb[k]) for k in pa)
