"""Paths stay inside the checkpoint: the repacked manifest's files, and what repack follows."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from flashmoe.errors import FlashMoeError
from flashmoe.loader import default_model_dir, load_model
from flashmoe.streaming.layout import MANIFEST
from flashmoe.tools import repack as repack_tool


@pytest.fixture(scope="module")
def repacked(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("paths")
    return repack_tool.repack(default_model_dir(), root / "repacked", log=lambda *_: None)


def copy_with(tmp_path: Path, repacked: Path, file: str) -> tuple[Path, Path]:
    """A copy of the repacked checkpoint whose first layer's manifest `file` is `file`."""
    folder = tmp_path / "ckpt"
    shutil.copytree(repacked, folder, symlinks=True)
    manifest = json.loads((folder / MANIFEST).read_text())
    first = next(iter(manifest["layers"].values()))
    original = first["file"]
    first["file"] = file
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder, folder / original


@pytest.mark.parametrize("file", ["../outside.bin", "/etc/passwd", "experts/../../outside.bin"])
def test_manifest_files_outside_the_checkpoint_are_refused(tmp_path, repacked, file):
    folder, _ = copy_with(tmp_path, repacked, file)
    with pytest.raises(FlashMoeError, match="outside the checkpoint") as info:
        load_model(folder, stream_experts=True)
    assert MANIFEST in str(info.value)


def test_a_symlink_leading_outside_is_refused(tmp_path, repacked):
    folder, original = copy_with(tmp_path, repacked, "experts/link.bin")
    shutil.copy(original, tmp_path / "elsewhere.bin")
    os.symlink(tmp_path / "elsewhere.bin", folder / "experts" / "link.bin")
    with pytest.raises(FlashMoeError, match="outside the checkpoint"):
        load_model(folder, stream_experts=True)


def test_a_symlink_that_stays_inside_is_fine(tmp_path, repacked):
    folder, original = copy_with(tmp_path, repacked, "experts/link.bin")
    os.symlink(original.name, folder / "experts" / "link.bin")  # relative, as Hugging Face caches link blobs
    model = load_model(folder, stream_experts=True)
    assert model.report.stream_stats is not None


def test_non_regular_expert_files_are_refused(tmp_path, repacked):
    folder, original = copy_with(tmp_path, repacked, "experts/pipe.bin")
    os.mkfifo(folder / "experts" / "pipe.bin")
    with pytest.raises(FlashMoeError, match="pipe.bin: not a regular file"):
        load_model(folder, stream_experts=True)


@pytest.mark.parametrize("file", [None, 3, ""])
def test_manifest_file_of_the_wrong_type(tmp_path, repacked, file):
    folder, _ = copy_with(tmp_path, repacked, file)
    with pytest.raises(FlashMoeError, match="expected a relative path"):
        load_model(folder, stream_experts=True)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.update(layers=[]),
        lambda m: next(iter(m["layers"].values())).update(experts="x"),
        lambda m: next(iter(m["layers"].values())).update(tensors=[]),
        lambda m: next(iter(m["layers"].values()))["tensors"]["gate_proj.weight"].update(offset=-64),
        lambda m: next(iter(m["layers"].values()))["tensors"]["gate_proj.weight"].update(shape=[-1, 2]),
        lambda m: next(iter(m["layers"].values())).pop("experts"),
    ],
)
def test_malformed_manifests_are_flashmoe_errors(tmp_path, repacked, change):
    folder = tmp_path / "ckpt"
    shutil.copytree(repacked, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FlashMoeError, match=MANIFEST):
        load_model(folder, stream_experts=True)


def test_repack_refuses_symlinks_leading_outside_the_source(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(default_model_dir(), src)
    (tmp_path / "secret.txt").write_text("not part of the model")
    os.symlink(tmp_path / "secret.txt", src / "notes.txt")
    with pytest.raises(FlashMoeError, match="notes.txt: a symbolic link .* outside the source directory"):
        repack_tool.repack(src, tmp_path / "dst", log=lambda *_: None)
    assert not (tmp_path / "dst").exists()


def test_repack_follows_symlinks_that_stay_inside(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(default_model_dir(), src)
    (src / "tokenizer.json").rename(src / "blob")
    os.symlink("blob", src / "tokenizer.json")
    repack_tool.repack(src, tmp_path / "dst", log=lambda *_: None)
    assert (tmp_path / "dst" / MANIFEST).is_file()


@pytest.mark.parametrize("chunk", [0, -3])
def test_repack_refuses_chunk_experts_below_one(tmp_path, capsys, chunk):
    with pytest.raises(FlashMoeError, match="--chunk-experts"):
        repack_tool.repack(default_model_dir(), tmp_path / "dst", chunk_experts=chunk)
    with pytest.raises(SystemExit) as info:
        repack_tool.main([str(default_model_dir()), str(tmp_path / "dst"), "--chunk-experts", str(chunk)])
    assert info.value.code == 2 and "--chunk-experts" in capsys.readouterr().err


def test_repack_refuses_an_absurd_layer_count(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(default_model_dir(), src)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(FlashMoeError, match="num_hidden_layers"):
        repack_tool.repack(src, tmp_path / "dst", log=lambda *_: None)
