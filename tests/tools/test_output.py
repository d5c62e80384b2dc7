"""The tools' standards: help for every option, refusals that name the problem, nothing left behind."""

from __future__ import annotations

import argparse
import json

import pytest

from flashmoe.errors import FlashMoeError
from flashmoe.tools import convert, repack, synth

SYNTH = ["--preset", "qwen3-moe-small", "--layers", "1", "--quiet"]


@pytest.mark.parametrize("tool", [convert, repack, synth], ids=lambda t: t.__name__.rsplit(".", 1)[-1])
def test_every_option_has_help(tool, monkeypatch):
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        tool.main([])
    missing = [a.dest for a in parsers[0]._actions if not a.help]
    assert not missing, f"options without help text: {missing}"
    assert "--force" in parsers[0].format_help() and "--quiet" in parsers[0].format_help()


def test_convert_refuses_an_override_that_matches_nothing(float_checkpoint, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    assert convert.main([str(float_checkpoint), str(out), "--override", "swich_mlp=2"]) == 1
    err = capsys.readouterr().err
    assert "--override swich_mlp=2" in err and "'swich_mlp'" in err and "matches no" in err
    assert not (tmp_path / "new").exists()


def test_convert_refuses_a_non_empty_output_unless_forced(float_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert.main([str(float_checkpoint), str(out), "--quiet"]) == 0
    (out / "stale.safetensors").write_bytes(b"old")
    assert convert.main([str(float_checkpoint), str(out), "--bits", "8"]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert convert.main([str(float_checkpoint), str(out), "--bits", "8", "--force", "--quiet"]) == 0
    assert not (out / "stale.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8


def test_force_does_not_delete_a_directory_that_holds_no_checkpoint(float_checkpoint, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert convert.main([str(float_checkpoint), str(tmp_path), "--force"]) == 1
    assert "refusing to delete" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"


def test_convert_leaves_nothing_behind_when_it_fails(float_checkpoint, tmp_path, monkeypatch, capsys):
    def broken(directory):
        raise FlashMoeError("checked: broken")

    monkeypatch.setattr(convert, "check_checkpoint", broken)
    assert convert.main([str(float_checkpoint), str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    assert convert.main([str(float_checkpoint), str(tmp_path / "empty")]) == 1
    assert list((tmp_path / "empty").iterdir()) == []  # it was there before, empty: it stays, empty


def test_synth_refuses_a_non_empty_out_unless_forced(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert synth.main([*SYNTH, "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert synth.main([*SYNTH, "--out", str(out), "--force"]) == 0
    assert "num_hidden_layers" in (out / "config.json").read_text()


def test_synth_leaves_nothing_behind_when_interrupted(tmp_path, monkeypatch):
    def interrupted(out):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_write_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synth.main([*SYNTH, "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()


def test_repack_refuses_a_non_empty_dst_unless_forced(quantized_checkpoint, tmp_path, capsys):
    out = tmp_path / "r"
    assert repack.main([str(quantized_checkpoint), str(out), "--quiet"]) == 0
    assert repack.main([str(quantized_checkpoint), str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert repack.main([str(quantized_checkpoint), str(out), "--force", "--quiet"]) == 0
    assert (out / "flashmoe_experts.json").is_file()


def test_repack_leaves_nothing_behind_when_it_fails_before_saving_progress(
    quantized_checkpoint, tmp_path, monkeypatch, capsys
):
    def broken(*args):
        raise OSError("disk on fire")

    monkeypatch.setattr(repack, "_copy_non_experts", broken)
    assert repack.main([str(quantized_checkpoint), str(tmp_path / "r")]) == 1
    assert "disk on fire" in capsys.readouterr().err and not (tmp_path / "r").exists()
