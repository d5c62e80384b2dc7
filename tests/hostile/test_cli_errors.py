"""Clean command-line errors: bad option values name the option, nothing half-written exits 0."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from flashmoe import cli, loader
from flashmoe.loader import default_model_dir
from flashmoe.tools import convert, repack, synth


@pytest.fixture(autouse=True)
def no_backend_note(monkeypatch):
    """The first load of a process notes its kernel backend on stderr; these tests count error lines."""
    monkeypatch.setattr(loader, "_said", {"auto"})


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "argv,option",
    [
        (["--seed", "-1"], "--seed"),
        (["--seed", "1.5"], "--seed"),
        (["--seed", str(2**64)], "--seed"),
        (["--expert-cache-mb", "inf", "--stream-experts"], "--expert-cache-mb"),
        (["--expert-cache-mb", "nan", "--stream-experts"], "--expert-cache-mb"),
        (["--temp", "nan"], "--temp"),
        (["--temp", "inf"], "--temp"),
        (["--temp", "-1"], "--temp"),
        (["--top-p", "nan"], "--top-p"),
        (["--top-p", "0"], "--top-p"),
        (["--top-k", "-2"], "--top-k"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--max-tokens", "1e9"], "--max-tokens"),
        (["--k", "0"], "--k"),
    ],
)
def test_bad_values_are_refused_naming_the_option(capsys, argv, option):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert option in one_line(captured.err) and captured.out == ""


def test_stdin_that_is_not_utf8(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(b"def f(\xff\xfe):")))
    assert cli.main(["--prompt", "-", "--max-tokens", "2"]) == 2
    captured = capsys.readouterr()
    assert "stdin is not UTF-8" in one_line(captured.err) and captured.out == ""


def test_a_broken_checkpoint_is_one_line_and_exit_1(tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(default_model_dir(), folder)
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    assert cli.main(["--model", str(folder), "--max-tokens", "2"]) == 1
    captured = capsys.readouterr()
    assert shard.name in one_line(captured.err) and captured.out == ""


def test_an_out_of_vocabulary_model_error_happens_before_any_output(tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(default_model_dir(), folder)
    (folder / "config.json").write_text(
        (folder / "config.json").read_text().replace('"num_experts_per_tok": 4', '"num_experts_per_tok": 99')
    )
    assert cli.main(["--model", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "num_experts_per_tok" in one_line(captured.err) and captured.out == ""


def test_the_module_entry_point_in_a_subprocess():
    run = subprocess.run(
        [sys.executable, "-m", "flashmoe", "--temp", "nan"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "--temp" in one_line(run.stderr) and run.stdout == ""


@pytest.mark.parametrize(
    "main,argv,option",
    [
        (convert.main, ["a", "b", "--bits", "7"], "--bits"),
        (convert.main, ["a", "b", "--bits", "x"], "--bits"),
        (convert.main, ["a", "b", "--group-size", "0"], "--group-size"),
        (convert.main, ["a", "b", "--override", "mlp=9"], "--override"),
        (convert.main, ["a", "b", "--override", "(=4"], "--override"),
        (repack.main, ["a", "b", "--chunk-experts", "0"], "--chunk-experts"),
        (repack.main, ["a", "b", "--chunk-experts", "x"], "--chunk-experts"),
        (synth.main, ["--preset", "x", "--out", "o"], "--preset"),
        (
            synth.main,
            ["--preset", sorted(synth.PRESETS)[0], "--out", "o", "--layers", "0"],
            "--layers",
        ),
        (
            synth.main,
            ["--preset", sorted(synth.PRESETS)[0], "--out", "o", "--layers", "100000"],
            "--layers",
        ),
        (
            synth.main,
            ["--preset", sorted(synth.PRESETS)[0], "--out", "o", "--seed", "-1"],
            "--seed",
        ),
    ],
)
def test_tool_arguments_are_refused_naming_the_option(tmp_path, monkeypatch, capsys, main, argv, option):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    assert info.value.code == 2 and option in captured.err and captured.out == ""
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()


def test_repack_of_a_broken_source_is_exit_1_and_leaves_no_manifest(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(default_model_dir(), src)
    shard = next(src.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes() + b"junk")
    assert repack.main([str(src), str(tmp_path / "dst")]) == 1
    assert shard.name in capsys.readouterr().err
    assert not (tmp_path / "dst" / "flashmoe_experts.json").exists()
