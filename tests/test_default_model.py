"""The bundled default model: mlx-lm agrees with it, its routing matters, and it writes Python."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import flashmoe
from flashmoe.analysis.evaluate import perplexity
from flashmoe.analysis.parity import greedy_tokens, mlx_lm_cache, mlx_lm_model
from flashmoe.loader import default_model_dir, load_model

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["def parse(", "import os\n", "class Config:", "for i in range(", "    def __init__(self"]
SIGNATURES = json.loads((Path(__file__).parent / "data" / "heldout_signatures.json").read_text())
HELDOUT = REPO / "training" / "data" / "heldout.bin"


@pytest.fixture(scope="module")
def bundled():
    directory = default_model_dir()
    assert directory is not None, "flashmoe/assets/flashmoe-coder-tiny is missing from this install"
    return flashmoe.load(None, dtype=mx.float32)  # float32 on any device, as mlx_lm_model gives mlx-lm


def test_mlx_lm_generates_the_same_greedy_tokens_for_five_prompts(bundled):
    model, tokenizer = bundled
    reference = mlx_lm_model(default_model_dir())
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        theirs = greedy_tokens(reference, mlx_lm_cache(reference), ids, 24)
        assert greedy_tokens(model, model.make_cache, ids, 24) == theirs, prompt


@pytest.mark.slow
def test_corrupted_gates_make_held_out_perplexity_at_least_3x_worse():
    tokens = np.fromfile(HELDOUT, dtype=np.uint16).astype(np.int32)
    fixed = perplexity(load_model(default_model_dir()), tokens, max_tokens=4096)
    buggy = perplexity(load_model(default_model_dir(), quant="global"), tokens, max_tokens=4096)
    assert buggy >= 3 * fixed, f"perplexity {fixed:.2f} with config bits, {buggy:.2f} with the bug"


@pytest.mark.slow
def test_at_least_6_of_10_held_out_signatures_complete_to_valid_python(bundled):
    """Greedy, 96 tokens, cut at the first blank line, parsed by ast (the signature without its newline:
    the tokenizer merges a newline with the next line's indentation)."""
    model, tokenizer = bundled
    valid = []
    for item in SIGNATURES:
        prompt = item["prompt"].rstrip("\n")
        body = (prompt + flashmoe.generate(model, tokenizer, prompt, max_tokens=96)).split("\n\n")[0]
        try:
            ast.parse(body)
            valid.append(prompt)
        except SyntaxError:
            pass
    assert len(valid) >= 6, f"{len(valid)} of 10 valid: {valid}"


def test_python_m_flashmoe_runs_the_bundled_model_from_another_folder(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "flashmoe", "--prompt", "def add(a, b):", "--max-tokens", "16"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "Generation: 16 tokens" in run.stderr
