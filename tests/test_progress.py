"""Progress bars: drawn on a terminal, absent in a pipe or a log, and nothing at all with --quiet."""

from __future__ import annotations

import io
import sys

import mlx.core as mx

import flashmoe.loader as loader
from flashmoe import progress
from flashmoe.loader import load_model
from flashmoe.tools import convert, repack, synth

SYNTH = ["--preset", "qwen3-moe-small", "--layers", "1"]


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def no_bar(text: str) -> bool:
    """No tqdm output: no carriage returns, no bar."""
    return "\r" not in text and "|" not in text and "it/s" not in text and "B/s" not in text


def test_no_bar_unless_stderr_is_a_terminal(monkeypatch):
    assert progress.shown(None) is False  # pytest captures stderr: not a terminal
    assert progress.shown(False) is False and progress.shown(True) is True
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress.shown(None) is True and progress.shown(False) is False


def test_synth_not_on_a_terminal_prints_lines_but_no_bar(tmp_path, capsys):
    assert synth.main([*SYNTH, "--out", str(tmp_path / "s")]) == 0
    out, err = capsys.readouterr()
    assert "model-00001-of-00002.safetensors" in out and "wrote" in out
    assert no_bar(err)


def test_synth_quiet_prints_nothing(tmp_path, capsys):
    assert synth.main([*SYNTH, "--out", str(tmp_path / "s"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert (tmp_path / "s" / "config.json").is_file()


def test_synth_on_a_terminal_draws_a_bar_and_quiet_still_does_not(tmp_path, monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert synth.main([*SYNTH, "--out", str(tmp_path / "a")]) == 0
    assert "writing a" in terminal.getvalue() and "\r" in terminal.getvalue()
    capsys.readouterr()
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert synth.main([*SYNTH, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert quiet.getvalue() == "" and capsys.readouterr().out == ""


def test_convert_quiet_and_not_on_a_terminal(float_checkpoint, tmp_path, capsys):
    assert convert.main([str(float_checkpoint), str(tmp_path / "q"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert convert.main([str(float_checkpoint), str(tmp_path / "p")]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == f"wrote {tmp_path / 'p'}"


def test_convert_on_a_terminal_draws_a_bar(float_checkpoint, tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert convert.main([str(float_checkpoint), str(tmp_path / "t")]) == 0
    assert "quantizing" in terminal.getvalue()


def test_repack_quiet_and_not_on_a_terminal(quantized_checkpoint, tmp_path, capsys):
    assert repack.main([str(quantized_checkpoint), str(tmp_path / "q"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert repack.main([str(quantized_checkpoint), str(tmp_path / "p")]) == 0
    out, err = capsys.readouterr()
    assert "layer 0" in out and "repacked" in out and no_bar(err) and err == ""


def test_repack_on_a_terminal_draws_a_bar(quantized_checkpoint, tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert repack.main([str(quantized_checkpoint), str(tmp_path / "t")]) == 0
    assert "repacking" in terminal.getvalue()


def test_loading_a_large_checkpoint_reads_it_shard_by_shard_under_a_bar(
    quantized_checkpoint, monkeypatch, seed
):
    tokens = mx.random.randint(0, 256, (1, 6))
    expected = load_model(quantized_checkpoint)(tokens)
    monkeypatch.setattr(loader, "LARGE_CHECKPOINT_BYTES", 0)  # everything is large
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert mx.array_equal(load_model(quantized_checkpoint, progress=False)(tokens), expected)
    assert terminal.getvalue() == ""  # quiet: no bar
    assert mx.array_equal(load_model(quantized_checkpoint)(tokens), expected)
    assert f"loading {quantized_checkpoint.name}" in terminal.getvalue()


def test_loading_a_small_checkpoint_draws_no_bar(quantized_checkpoint, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    load_model(quantized_checkpoint)
    assert terminal.getvalue() == ""
