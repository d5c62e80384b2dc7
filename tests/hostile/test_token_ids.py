"""Token ids against the vocabulary: prompt ids in generate, tokenizer size against the embedding at load."""

from __future__ import annotations

import json
import shutil

import pytest

import flashmoe
from flashmoe.errors import FlashMoeError
from flashmoe.generate import generate, stream_generate
from flashmoe.loader import default_model_dir
from tests.helpers import MockModel, write_tiny_tokenizer


@pytest.fixture(scope="module")
def loaded():
    return flashmoe.load()


@pytest.mark.parametrize(
    "ids,words",
    [
        ([1, 2048], "prompt token 2048 at position 1 is outside the model's vocabulary [0, 2048)"),
        ([-1], "prompt token -1 at position 0"),
        ([10**12], "prompt token 1000000000000"),
        ([1, "a"], "'a' is not an integer id"),
        ([1.5], "1.5 is not an integer id"),
        ([None], "None is not"),
        ([], "the prompt is empty"),
    ],
)
def test_prompt_ids_outside_the_vocabulary(loaded, ids, words):
    model, tokenizer = loaded
    with pytest.raises(FlashMoeError) as info:
        generate(model, tokenizer, ids, max_tokens=2)
    assert words in str(info.value)


def test_ids_at_the_edges_are_fine(loaded):
    model, tokenizer = loaded
    steps = list(stream_generate(model, tokenizer, [0, 2047], max_tokens=2))
    assert len(steps) >= 1


def test_a_tokenizer_larger_than_the_embedding_is_refused_naming_both_files(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(default_model_dir(), folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append(
        {
            "id": 5000,
            "content": "<|far|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(
        FlashMoeError, match="tokenizer.json: the tokenizer has 2049 ids .*2048 rows .*config.json"
    ):
        flashmoe.load(folder)


def test_a_mock_model_vocabulary_is_respected(tmp_path):
    tokenizer = flashmoe.Tokenizer.from_dir(write_tiny_tokenizer(tmp_path / "tok"))
    with pytest.raises(FlashMoeError, match="outside the model's vocabulary \\[0, 10\\)"):
        generate(MockModel(10), tokenizer, [3, 11], max_tokens=1)
