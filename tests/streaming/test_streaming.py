"""Expert streaming: the same logits as resident experts, in both layouts, with the right I/O counted."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np
import pytest

from flashmoe import FlashMoeError
from flashmoe.loader import load_model
from flashmoe.streaming.experts import StreamOptions
from flashmoe.streaming.layout import MANIFEST
from flashmoe.streaming.stats import format_stream_stats
from flashmoe.tools.repack import main as repack_main
from flashmoe.tools.repack import repack
from tests.helpers import CONFIGS, rel_err, write_checkpoint

TOLERANCE = 1e-6
LAYOUTS = ("safetensors", "repacked")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(model type, {layout: directory}, the resident model)."""
    source = write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    packed = repack(
        source, tmp_path_factory.mktemp(f"{request.param}-repacked") / "packed", log=lambda *_: None
    )
    return (
        request.param,
        {"safetensors": source, "repacked": packed},
        load_model(source, backend="mlx", dtype=mx.float32),
    )


def streamed(directory, **options):
    return load_model(directory, backend="mlx", dtype=mx.float32, stream_experts=StreamOptions(**options))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_logits_equal_resident(checkpoint, layout, seed):
    _, directories, resident = checkpoint
    model = streamed(directories[layout])
    tokens = mx.random.randint(0, resident.args.vocab_size, (2, 9))
    err = rel_err(model(tokens), resident(tokens))
    assert err < TOLERANCE, f"rel err {err:.3g} (seed {seed})"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_steps_through_the_cache_equal_resident(checkpoint, layout, seed):
    _, directories, resident = checkpoint
    model = streamed(directories[layout])
    tokens = mx.random.randint(0, resident.args.vocab_size, (1, 10))
    ours, theirs = model.make_cache(), resident.make_cache()
    steps = [(model(tokens[:, :5], ours), resident(tokens[:, :5], theirs))]
    steps += [
        (model(tokens[:, t : t + 1], ours), resident(tokens[:, t : t + 1], theirs)) for t in range(5, 10)
    ]
    for step, (a, b) in enumerate(steps):
        err = rel_err(a, b)
        assert err < TOLERANCE, f"step {step}: rel err {err:.3g} (seed {seed})"


def test_prefill_in_small_groups_equals_resident(checkpoint, seed):
    """A read budget below the union makes prefill read and compute the experts a few at a time."""
    _, directories, resident = checkpoint
    model = streamed(directories["repacked"], buffer_mb=0.05)  # ~2 tiny experts per group
    tokens = mx.random.randint(0, resident.args.vocab_size, (2, 7))
    err = rel_err(model(tokens), resident(tokens))
    # A group's gather_qmm has fewer rows than the resident one: on a GPU, MLX picks its matmul
    # kernel (and so its float32 summation order) by row count (H200: 1.2e-6, 6.8e-6 on the hybrid
    # models); the GPU float32 tolerance of the other GPU tests (test_gpu_path) holds there.
    tolerance = TOLERANCE if mx.default_device() == mx.cpu else 1e-4
    assert err < tolerance, f"rel err {err:.3g} (seed {seed})"
    assert model.report.stream_stats.prefill.calls == len(model.moe_layers)  # one call per layer, many reads


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plain_bf16_experts_stream_too(tmp_path, layout, seed):
    source = write_checkpoint(tmp_path / "plain", "qwen3_moe", quantize=False)
    directory = (
        source if layout == "safetensors" else repack(source, tmp_path / "packed", log=lambda *_: None)
    )
    tokens = mx.random.randint(0, 256, (1, 6))
    err = rel_err(streamed(directory)(tokens), load_model(source, backend="mlx", dtype=mx.float32)(tokens))
    assert err < TOLERANCE, f"rel err {err:.3g} (seed {seed})"


def test_lru_serves_repeats_with_the_same_logits(checkpoint, seed):
    _, directories, resident = checkpoint
    model = streamed(directories["repacked"], expert_cache_mb=64)
    token = mx.random.randint(0, resident.args.vocab_size, (1, 1))
    first, second = model(token), model(token)
    assert rel_err(second, first) == 0 and rel_err(first, resident(token)) < TOLERANCE
    decode = model.report.stream_stats.summary()["decode"]
    assert decode["lru_hit_rate"] == pytest.approx(0.5)  # the second call found all its experts cached


@pytest.mark.parametrize("layout, reads_per_expert", [("safetensors", 9), ("repacked", 1)])
def test_decode_reads_k_experts_per_layer(checkpoint, layout, reads_per_expert):
    _, directories, resident = checkpoint
    model = streamed(directories[layout])
    cache = model.make_cache()
    for t in range(3):
        model(mx.array([[t + 1]]), cache)
    layer = model.layers[model.moe_layers[0]].mlp.experts.layer
    expected = resident.args.num_experts_per_tok * len(model.moe_layers)  # experts read per token
    s = model.report.stream_stats.summary()["decode"]
    assert s["tokens"] == 3 and s["experts_per_token"] == expected
    assert s["bytes_per_token"] == s["theory_bytes_per_token"] == expected * layer.expert_bytes
    assert s["reads_per_token"] == expected * reads_per_expert
    assert 0 <= s["page_cache_hit_rate"] <= 1
    assert "decode" in format_stream_stats(model.report.stream_stats)


def test_decode_reads_in_routing_order_and_reuses_its_local_ids(checkpoint, monkeypatch):
    """A decode token's experts are read in the order routing chose them, so the kernel's local ids
    are 0..K-1: one array made once per layer, not a fresh one sent to the device every token."""
    from flashmoe.streaming import experts as streaming

    _, directories, resident = checkpoint
    model = streamed(directories["repacked"])
    cache = model.make_cache()
    model(mx.array([[5, 6]]), cache)  # the prompt: a union read in id order
    reads, local_ids = [], []
    read, mixed = streaming.ExpertReader.read, streaming.mixed_experts
    monkeypatch.setattr(
        streaming.ExpertReader,
        "read",
        lambda self, layer, ids: reads.append(ids.copy()) or read(self, layer, ids),
    )
    monkeypatch.setattr(streaming, "mixed_experts", lambda *a, **k: local_ids.append(a[4]) or mixed(*a, **k))
    for t in range(3):
        model(mx.array([[t + 1]]), cache)
    routed = [np.array(r.experts).reshape(-1) for r in model.routing().values()]  # the last token's
    k = resident.args.num_experts_per_tok
    assert len(reads) == 3 * len(model.moe_layers) and all(len(r) == k for r in reads)
    assert all(np.array_equal(r, want) for r, want in zip(reads[-len(routed) :], routed))
    assert all(np.array_equal(np.array(ids).reshape(-1), np.arange(k)) for ids in local_ids)
    per_layer = {id(ids) for ids in local_ids}
    assert len(per_layer) == len(model.moe_layers), "a new local-id array per token"


def test_prefill_reads_the_union_once(checkpoint):
    _, directories, resident = checkpoint
    model = streamed(directories["repacked"])
    model(mx.arange(16)[None] % resident.args.vocab_size)
    union = sum(len(np.unique(np.array(r.experts))) for r in model.routing().values())
    slots = 16 * resident.args.num_experts_per_tok * len(model.moe_layers)
    assert model.report.stream_stats.prefill.experts == union < slots


# --------------------------------------------------------------------------- repack and errors


def test_repack_cli_writes_the_manifest_and_can_delete_the_source(tmp_path):
    source = write_checkpoint(tmp_path / "src", "qwen3_moe")
    assert repack_main([str(source), str(tmp_path / "dst"), "--delete-source"]) == 0
    manifest = json.loads((tmp_path / "dst" / MANIFEST).read_text())
    layer = manifest["layers"]["model.layers.0.mlp"]
    assert len(layer["experts"]) == CONFIGS["qwen3_moe"]["num_experts"]
    assert set(layer["tensors"]) == {
        f"{p}.{k}" for p in ("gate_proj", "up_proj", "down_proj") for k in ("weight", "scales", "biases")
    }
    assert not list(source.glob("*.safetensors"))
    assert (tmp_path / "dst" / "config.json").is_file()
    assert repack_main([str(tmp_path / "dst"), str(tmp_path / "again")]) == 1  # already repacked


def test_interrupted_repack_resumes(tmp_path, monkeypatch):
    import flashmoe.tools.repack as repack_module

    source = write_checkpoint(tmp_path / "src", "qwen3_next")
    write_layer, calls = repack_module._write_layer, []

    def failing(*args):  # the disk fills up during the third layer
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return write_layer(*args)

    monkeypatch.setattr(repack_module, "_write_layer", failing)
    with pytest.raises(OSError):
        repack(source, tmp_path / "dst", delete_source=True, log=lambda *_: None)
    monkeypatch.setattr(repack_module, "_write_layer", write_layer)
    with pytest.raises(FlashMoeError, match="--resume"):
        repack(source, tmp_path / "dst", log=lambda *_: None)
    repack(source, tmp_path / "dst", delete_source=True, resume=True, log=lambda *_: None)
    tokens = mx.arange(1, 9)[None]
    reference = load_model(
        write_checkpoint(tmp_path / "again", "qwen3_next"), backend="mlx", dtype=mx.float32
    )(tokens)
    assert rel_err(streamed(tmp_path / "dst")(tokens), reference) < TOLERANCE


def test_repack_refuses_to_start_what_the_disk_cannot_hold(tmp_path, monkeypatch):
    import shutil

    source = write_checkpoint(tmp_path / "src", "qwen3_moe")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(FlashMoeError, match=r"needs 0\.\d GB free.*--delete-source"):
        repack(source, tmp_path / "dst", log=lambda *_: None)


def test_repacked_checkpoint_needs_streaming(checkpoint):
    _, directories, _ = checkpoint
    with pytest.raises(FlashMoeError, match="stream_experts=True"):
        load_model(directories["repacked"])


def test_truncated_expert_file_names_file_and_tensor(tmp_path):
    source = write_checkpoint(tmp_path / "src", "qwen3_moe")
    packed = repack(source, tmp_path / "dst", log=lambda *_: None)
    layer_file = packed / "experts" / "layer-003.bin"
    os.truncate(layer_file, layer_file.stat().st_size - 5000)  # past the last block's padding
    with pytest.raises(FlashMoeError, match=r"layer-003\.bin.*model\.layers\.3\.mlp\.switch_mlp\.\w+\.\w+"):
        streamed(packed)


def test_manifest_missing_tensor_is_named(tmp_path):
    packed = repack(write_checkpoint(tmp_path / "src", "qwen3_moe"), tmp_path / "dst", log=lambda *_: None)
    manifest = json.loads((packed / MANIFEST).read_text())
    del manifest["layers"]["model.layers.2.mlp"]["tensors"]["up_proj.scales"]
    (packed / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        FlashMoeError, match=r"model\.layers\.2\.mlp\.switch_mlp\.up_proj\.scales' is missing"
    ):
        streamed(packed)


def test_experts_stored_one_by_one_are_refused(tmp_path):
    from flashmoe.safetensors import SafetensorsWriter

    source = write_checkpoint(tmp_path / "src", "qwen3_moe")
    with SafetensorsWriter(
        source / "extra.safetensors",
        [("model.layers.0.mlp.experts.0.up_proj.weight", "BF16", (4, 4))],
    ) as writer:
        writer.write("model.layers.0.mlp.experts.0.up_proj.weight", np.zeros(16, np.uint16))
    with pytest.raises(FlashMoeError, match=r"extra\.safetensors.*experts\.0\.up_proj\.weight.*convert"):
        streamed(source)


def test_expert_count_disagreeing_with_config_names_file_and_tensor(tmp_path):
    source = write_checkpoint(tmp_path / "src", "qwen3_moe")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_experts": 16}))
    with pytest.raises(
        FlashMoeError,
        match=r"model\.safetensors: tensor 'model\.layers\.\d\.mlp\.switch_mlp\..*"
        r"has shape \[8, .*expected \(16, out, in\)",
    ):
        streamed(source)


def test_bad_cache_size_is_refused(checkpoint):
    _, directories, _ = checkpoint
    with pytest.raises(FlashMoeError, match="expert_cache_mb"):
        load_model(directories["repacked"], stream_experts=True, expert_cache_mb=-1)
