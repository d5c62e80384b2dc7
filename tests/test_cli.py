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
    args = [
        "--model",
        str(tiny_dir),
        "--prompt",
        "a",
        "--max-tokens",
        "3",
        "--k",
        "2",
        "--backend",
        "mlx",
        "--quant",
        "global",
        "--temp",
        "0.7",
        "--top-k",
        "1",
        "--seed",
        "4",
    ]
    assert cli.main(args) == 0
    assert loaded["calls"][0] == {
        "path": str(tiny_dir),
        "backend": "mlx",
        "quant": "global",
        "k": 2,
    }
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
    assert (
        cli.main(
            [
                "--model",
                str(tiny_dir),
                "--prompt",
                "Hi",
                "--chat",
                "--system",
                "Be brief.",
                "--max-tokens",
                "1",
            ]
        )
        == 0
    )
    expected = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
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


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--max-tokens", "zero"], "--max-tokens"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--top-p", "1.5"], "--top-p"),
        (["--temp", "-1"], "--temp"),
        (["--backend", "vulkan"], "--backend"),
        (["--bogus"], "--bogus"),
        (["--system", "x"], "--chat"),
    ],
)
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
    run = subprocess.run(
        [sys.executable, "-m", "flashmoe", "--model", "/nonexistent"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and run.stdout == ""
    assert "/nonexistent" in one_error_line(run.stderr)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next"])
def test_end_to_end_with_the_real_loader(tmp_path, capsys, model_type):
    """A tiny random checkpoint through flashmoe.loader.load: the CLI runs it and times its phases."""
    from tests.helpers import write_checkpoint, write_tiny_tokenizer

    folder = write_tiny_tokenizer(write_checkpoint(tmp_path / model_type, model_type))
    assert cli.main(["--model", str(folder), "--prompt", "Le café", "--max-tokens", "5", "--timing"]) == 0
    err = capsys.readouterr().err
    assert "Generation: " in err and "Peak memory: " in err
    assert all(phase in err for phase in ("attention", "routing", "experts", "sampling"))


def test_streaming_options_reach_load_and_need_each_other(loaded, tiny_dir, capsys):
    assert cli.main(["--model", str(tiny_dir), "--expert-cache-mb", "64"]) == 2
    assert "--expert-cache-mb needs --stream-experts" in one_error_line(capsys.readouterr().err)
    argv = [
        "--model",
        str(tiny_dir),
        "--stream-experts",
        "--expert-cache-mb",
        "64",
        "--max-tokens",
        "2",
    ]
    assert cli.main(argv) == 0
    assert loaded["calls"][-1]["stream_experts"] is True and loaded["calls"][-1]["expert_cache_mb"] == 64.0


# --- what a researcher meets first -------------------------------------------------------------------


def test_the_prompt_is_echoed_on_stderr_before_the_completion(loaded, tiny_dir, capsys):
    assert cli.main(["--model", str(tiny_dir), "--prompt", "The quick", "--max-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("The quick") and "The quick" not in out  # stdout: the completion alone
    assert cli.main(["--model", str(tiny_dir), "--prompt", "The quick", "--max-tokens", "2", "--quiet"]) == 0
    assert "The quick" not in capsys.readouterr().err


def test_quant_global_says_what_it_misreads(loaded, tiny_dir, capsys):
    from types import SimpleNamespace

    loaded["model"].report = SimpleNamespace(
        misread_modules=["a.gate", "b.gate"], bytes_per_token={}, stream_stats=None
    )
    assert cli.main(["--model", str(tiny_dir), "--quant", "global", "--max-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "deliberately" in err and "top-level bits" in err and "2 quantized modules" in err


def test_chat_help_and_error_name_the_models_that_support_it(loaded, tiny_dir, capsys):
    assert cli.main(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "chat_template.jinja" in help_text and "plain Python-code model" in help_text
    tok = loaded["tokenizer"]
    loaded["tokenizer"] = Tokenizer(tok.backend, tok.eos_token_ids, chat_template=None, source=str(tiny_dir))
    assert cli.main(["--model", str(tiny_dir), "--chat"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "tokenizer_config.json" in line and "chat_template.jinja" in line and "drop --chat" in line


def test_sampling_without_a_seed_draws_one_and_prints_it(loaded, tiny_dir, capsys):
    seeds = []
    for _ in range(2):
        assert cli.main(["--model", str(tiny_dir), "--temp", "0.8", "--max-tokens", "2"]) == 0
        line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("Seed: "))
        assert "drawn at random" in line
        seeds.append(int(line.split()[1]))
    assert seeds[0] != seeds[1]
    assert cli.main(["--model", str(tiny_dir), "--temp", "0.8", "--seed", "7", "--max-tokens", "2"]) == 0
    assert "Seed: 7 (given" in capsys.readouterr().err
    assert cli.main(["--model", str(tiny_dir), "--max-tokens", "2"]) == 0
    assert "Seed:" not in capsys.readouterr().err  # greedy: nothing drawn


def test_help_shows_the_defaults(capsys):
    assert cli.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100)" in text and "(default: 1.0)" in text and "(default: auto)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--max-tokens", "zero"], "--max-tokens: must be an integer, got 'zero'"),
        (["--temp", "warm"], "--temp: must be a number, got 'warm'"),
        (["--max-tokens", "0"], "--max-tokens: must be at least 1, got 0"),
        (["--top-p", "0"], "--top-p: must be greater than 0.0 and at most 1.0, got 0"),
    ],
)
def test_error_texts_read_naturally(loaded, tiny_dir, capsys, argv, words):
    assert cli.main(["--model", str(tiny_dir), *argv]) == 2
    assert words in one_error_line(capsys.readouterr().err)


def test_format_stats_gives_the_bandwidth_gpt_fast_style():
    from flashmoe.generate import GenerationStep, format_stats

    step = GenerationStep(
        1,
        "x",
        prompt_tokens=3,
        prompt_tps=10.0,
        generation_tokens=8,
        generation_tps=50.0,
        peak_memory_gb=0.5,
    )
    text = format_stats(step, bytes_per_token=2e6)
    assert "Bandwidth: 0.100 GB/s (2.000 MB of weights read per token x 50.000 tokens-per-sec)" in text
    assert "Bandwidth" not in format_stats(step)


def test_bytes_per_token_against_a_hand_count(tmp_path):
    """qwen3_moe, 8 experts top-2: every non-expert tensor, one embedding row, 2/8 of each expert tensor."""
    from flashmoe.analysis.bench import weight_bytes_per_token
    from flashmoe.loader import load_model

    folder = write_tiny_tokenizer_checkpoint(tmp_path)
    arrays = mx.load(str(next(folder.glob("*.safetensors"))))
    embedding = sum(v.nbytes for k, v in arrays.items() if k.startswith("model.embed_tokens."))
    experts = sum(v.nbytes for k, v in arrays.items() if ".switch_mlp." in k)
    rest = sum(v.nbytes for k, v in arrays.items()) - embedding - experts
    vocab = arrays["model.embed_tokens.weight"].shape[0]
    expected = {"dense": rest + embedding / vocab, "experts": experts * 2 / 8}
    expected["total"] = expected["dense"] + expected["experts"]
    assert load_model(folder).report.bytes_per_token == pytest.approx(expected)
    assert weight_bytes_per_token(folder) == pytest.approx(expected)
    assert load_model(folder, k=4).report.bytes_per_token["experts"] == pytest.approx(experts * 4 / 8)


def write_tiny_tokenizer_checkpoint(tmp_path):
    from tests.helpers import write_checkpoint, write_tiny_tokenizer

    return write_tiny_tokenizer(write_checkpoint(tmp_path / "qwen3_moe", "qwen3_moe"))


def test_the_real_cli_prints_the_bandwidth_and_streaming_stats_in_words(capsys):
    assert cli.main(["--prompt", "def parse(", "--max-tokens", "4", "--timing", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Bandwidth: " in err and "MB of weights read per token" in err
    assert "weights read per token: " in err and " GB/s" in err  # --timing's line
    assert (
        cli.main(
            [
                "--prompt",
                "def parse(",
                "--max-tokens",
                "4",
                "--timing",
                "--stream-experts",
                "--quiet",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "the experts' as streamed from disk" in err
    assert "page cache hits" in err and "expected MB/token" in err and "LRU hits" in err
    assert "page$" not in err and "theory" not in err
