"""`python -m flashmoe` in-process, with flashmoe.loader.load replaced by the mock model + tiny tokenizer."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import flashmoe
from flashmoe import cli, timing
from flashmoe.tokenizer import Tokenizer
from tests.helpers import MULTIBYTE, MockModel, script_model

REPO = Path(__file__).resolve().parents[1]


class PhaseModel(MockModel):
    """A mock model that marks one phase per call, as the real forward pass does."""

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        logits = super().__call__(tokens, cache)
        timing.timer.mark("experts", logits)
        return logits


@pytest.fixture
def loaded(monkeypatch, tiny_dir):
    """Patch flashmoe.loader.load; return a record of its calls."""
    import flashmoe.loader as loading

    tok = Tokenizer.from_dir(tiny_dir)
    record = {"model": MockModel(tok.vocab_size), "tokenizer": tok, "calls": []}

    def fake_load(path, backend="auto", quant="config", k=None, **streaming):
        record["calls"].append({"path": path, "backend": backend, "quant": quant, "k": k, **streaming})
        return record["model"], record["tokenizer"]

    monkeypatch.setattr(loading, "load", fake_load, raising=False)
    return record


def one_error_line(err: str) -> str:
    """The single stderr line of a refused command (no usage block, no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashmoe: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_streams_text_to_stdout_and_stats_to_stderr(loaded, tiny_dir, capsys):
    tok = loaded["tokenizer"]
    prompt = "The quick"
    loaded["model"] = script_model(tok, len(tok.encode(prompt)), tok.encode(MULTIBYTE) + [2])
    assert cli.main(["--model", str(tiny_dir), "--prompt", prompt, "--max-tokens", "60"]) == 0
    out, err = capsys.readouterr()
    assert out == MULTIBYTE + "\n"
    assert f"Prompt: {len(tok.encode(prompt))} tokens, " in err and "tokens-per-sec" in err
    assert f"Generation: {len(tok.encode(MULTIBYTE)) + 1} tokens, " in err
    assert "Peak memory: " in err and " GB" in err
    assert loaded["calls"] == [{"path": str(tiny_dir), "backend": "auto", "quant": "config", "k": None}]


def test_flushes_stdout_after_every_token(loaded, tiny_dir, monkeypatch):
    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.flushed: list[str] = []

        def flush(self):
            self.flushed.append(self.getvalue())

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["--model", str(tiny_dir), "--prompt", "a", "--max-tokens", "4"]) == 0
    assert len(set(out.flushed)) >= 4  # the text grew between flushes: it streamed


def test_options_reach_load_and_sampling(loaded, tiny_dir, capsys):
    args = ["--model", str(tiny_dir), "--prompt", "a", "--max-tokens", "3", "--k", "2", "--backend", "mlx",
            "--quant", "global", "--temp", "0.7", "--top-k", "1", "--seed", "4"]
    assert cli.main(args) == 0
    assert loaded["calls"][0] == {"path": str(tiny_dir), "backend": "mlx", "quant": "global", "k": 2}
    tok = loaded["tokenizer"]
    last = tok.encode("a")[-1]
    assert capsys.readouterr().out == tok.decode([last + 1, last + 2, last + 3]) + "\n"  # top-k 1 is greedy


def test_prompt_from_stdin_and_the_default_prompt(loaded, tiny_dir, monkeypatch, capsys):
    model = loaded["model"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Le café"))
    assert cli.main(["--model", str(tiny_dir), "--prompt", "-", "--max-tokens", "1"]) == 0
    tok = loaded["tokenizer"]
    assert capsys.readouterr().out == tok.decode([tok.encode("Le café")[-1] + 1]) + "\n"
    model.calls.clear()
    assert cli.main(["--model", str(tiny_dir), "--max-tokens", "1"]) == 0
    assert sum(model.calls) == len(tok.encode(cli.DEFAULT_PROMPT))


def test_chat_applies_the_template_with_the_system_message(loaded, tiny_dir, capsys):
    tok = loaded["tokenizer"]
    cache = loaded["model"].make_cache()
    loaded["model"].make_cache = lambda: cache
    assert cli.main(["--model", str(tiny_dir), "--prompt", "Hi", "--chat", "--system", "Be brief.",
                     "--max-tokens", "1"]) == 0
    expected = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi"}])
    assert cache[0].fed == tok.encode(expected)


def test_timing_prints_a_phase_table(loaded, tiny_dir, capsys):
    loaded["model"] = PhaseModel(loaded["tokenizer"].vocab_size)
    assert cli.main(["--model", str(tiny_dir), "--prompt", "a", "--max-tokens", "5", "--timing"]) == 0
    err = capsys.readouterr().err
    rows = {line.split()[0]: line for line in err.splitlines() if line.split()}
    assert "ms/token" in rows["phase"]
    for phase in ("experts", "sampling", "total"):
        assert phase in rows and rows[phase].rstrip().endswith("%")
    assert "(4 decode steps timed)" in err  # the first token belongs to the prompt phase
    assert not timing.timer.enabled


@pytest.mark.parametrize("argv, needle", [
    (["--max-tokens", "zero"], "--max-tokens"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temp", "-1"], "--temp"),
    (["--backend", "vulkan"], "--backend"),
    (["--bogus"], "--bogus"),
    (["--system", "x"], "--chat"),
])
def test_bad_arguments_give_one_line_and_exit_2(loaded, tiny_dir, capsys, argv, needle):
    assert cli.main(["--model", str(tiny_dir), *argv]) == 2
    out, err = capsys.readouterr()
    assert needle in one_error_line(err) and out == ""
    assert loaded["calls"] == []


def test_missing_model_path_gives_one_line(loaded, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli.main(["--model", str(missing)]) != 0
    assert str(missing) in one_error_line(capsys.readouterr().err)


def test_no_model_uses_the_bundled_one_or_says_there_is_none(loaded, monkeypatch, capsys):
    monkeypatch.setattr(cli, "default_model_dir", lambda: None)
    assert cli.main(["--prompt", "hi"]) == 2
    assert "no bundled default model" in one_error_line(capsys.readouterr().err)
    monkeypatch.setattr(cli, "default_model_dir", lambda: Path("bundled"))
    assert cli.main(["--prompt", "hi", "--max-tokens", "2"]) == 0
    assert loaded["calls"][-1]["path"] is None  # flashmoe.load(None): the bundled model


def test_errors_while_loading_give_one_line_and_exit_1(loaded, tiny_dir, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise flashmoe.FlashMoeError(f"{tiny_dir}/config.json: model_type 'llama' is not supported")

    monkeypatch.setattr(sys.modules["flashmoe.loader"], "load", broken)
    assert cli.main(["--model", str(tiny_dir)]) == 1
    assert "model_type 'llama'" in one_error_line(capsys.readouterr().err)


def test_chat_without_a_template_gives_one_line(loaded, tiny_dir, capsys):
    tok = loaded["tokenizer"]
    loaded["tokenizer"] = Tokenizer(tok.backend, tok.eos_token_ids, chat_template=None, source=str(tiny_dir))
    assert cli.main(["--model", str(tiny_dir), "--chat"]) == 1
    assert "no chat_template" in one_error_line(capsys.readouterr().err)


def test_python_m_flashmoe_with_a_missing_model_exits_cleanly():
    run = subprocess.run([sys.executable, "-m", "flashmoe", "--model", "/nonexistent"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and run.stdout == ""
    assert "/nonexistent" in one_error_line(run.stderr)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next"])
def test_end_to_end_with_the_real_loader(tmp_path, capsys, model_type):
    """A tiny random checkpoint through flashmoe.loader.load: the CLI runs it and times its phases."""
    from tests.helpers import write_tiny_tokenizer
    from tests.helpers import write_checkpoint

    folder = write_tiny_tokenizer(write_checkpoint(tmp_path / model_type, model_type))
    assert cli.main(["--model", str(folder), "--prompt", "Le café", "--max-tokens", "5", "--timing"]) == 0
    err = capsys.readouterr().err
    assert "Generation: " in err and "Peak memory: " in err
    assert all(phase in err for phase in ("attention", "routing", "experts", "sampling"))


def test_streaming_options_reach_load_and_need_each_other(loaded, tiny_dir, capsys):
    assert cli.main(["--model", str(tiny_dir), "--expert-cache-mb", "64"]) == 2
    assert "--expert-cache-mb needs --stream-experts" in one_error_line(capsys.readouterr().err)
    argv = ["--model", str(tiny_dir), "--stream-experts", "--expert-cache-mb", "64", "--max-tokens", "2"]
    assert cli.main(argv) == 0
    assert loaded["calls"][-1]["stream_experts"] is True and loaded["calls"][-1]["expert_cache_mb"] == 64.0
