"""Hugging Face ids in flashmoe.load and --model, without a network: a hub cache laid out by hand."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

import flashmoe
from flashmoe import cli, hub
from flashmoe.errors import FlashMoeError
from flashmoe.loader import _resolve_path, default_model_dir

REPO_ID = "flashmoe-test/coder-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """HF_HOME in tmp_path holding REPO_ID as huggingface_hub caches it, HF_HUB_OFFLINE=1, sockets refused."""
    home = tmp_path / "hf"
    repo = home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    shutil.copytree(default_model_dir(), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return repo / "snapshots" / COMMIT


def test_a_cached_id_loads_offline_and_runs_like_the_bundled_model(offline_hub):
    model, tokenizer = flashmoe.load(REPO_ID, progress=False)
    assert Path(model.report.directory) == offline_hub
    bundled, bundled_tokenizer = flashmoe.load(None)
    prompt = "def parse("
    assert flashmoe.generate(model, tokenizer, prompt, max_tokens=6) == flashmoe.generate(
        bundled, bundled_tokenizer, prompt, max_tokens=6
    )


def test_an_uncached_id_offline_is_a_clear_error(offline_hub):
    with pytest.raises(FlashMoeError) as info:
        flashmoe.load("flashmoe-test/not-cached")
    message = str(info.value)
    assert "flashmoe-test/not-cached" in message and "HF_HUB_OFFLINE" in message
    assert str(offline_hub.parents[2]) in message  # the cache folder: HF_HOME/hub


def test_a_local_directory_wins_over_an_id(offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(default_model_dir(), tmp_path / REPO_ID)
    assert _resolve_path(REPO_ID) == Path(REPO_ID)
    shutil.rmtree(tmp_path / REPO_ID)
    assert _resolve_path(REPO_ID) == offline_hub


def test_the_cache_folder_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.cache_dir() == tmp_path / "cache"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("mlx-community/Qwen3-Coder-Next-4bit", True),
        ("org/name.v2", True),
        ("a_b/c-d", True),
        ("name", False),
        ("/abs/path", False),
        ("./org/name", False),
        ("org/name/extra", False),
        ("org--x/name", False),
        ("org/na..me", False),
        ("-org/name", False),
        ("org/name.", False),
        ("", False),
    ],
)
def test_what_reads_as_an_id(text, expected):
    assert hub.is_repo_id(text) is expected


def test_the_cli_takes_an_id(offline_hub, capsys):
    assert cli.main(["--model", REPO_ID, "--prompt", "def parse(", "--max-tokens", "4", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "Generation: 4 tokens" in err


def test_the_cli_names_an_uncached_id_offline(offline_hub, capsys):
    assert cli.main(["--model", "flashmoe-test/not-cached", "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "flashmoe-test/not-cached" in err and "HF_HUB_OFFLINE" in err and "Traceback" not in err


def test_a_missing_path_that_is_no_id_is_refused_before_loading(capsys, tmp_path):
    assert cli.main(["--model", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
