"""Non-finite logits stop generation naming the step; sampling parameters and seeds are validated."""

from __future__ import annotations

import shutil

import mlx.core as mx
import pytest

import flashmoe
from flashmoe.errors import FlashMoeError
from flashmoe.generate import generate, stream_generate
from flashmoe.loader import default_model_dir
from flashmoe.safetensors import read_tensors
from flashmoe.sample import make_sampler
from tests.helpers import MockModel, write_tiny_tokenizer


class NanAfter(MockModel):
    """A mock model whose logits turn NaN (or inf) from prompt position `at` on."""

    def __init__(self, vocab_size: int, at: int, value=float("nan")):
        super().__init__(vocab_size)
        self.at, self.value = at, value

    def __call__(self, tokens, cache=None):
        start = len(cache[0].fed) if cache else 0
        logits = super().__call__(tokens, cache)
        positions = start + mx.arange(tokens.shape[1])[None, :, None]
        return mx.where(positions >= self.at, mx.array(self.value), logits)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return flashmoe.Tokenizer.from_dir(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_generation_stops_naming_the_step(tokenizer, value, temperature):
    model = NanAfter(50, at=5, value=value)  # prompt of 3 ids: positions 2, 3, 4 are fine, 5 is not
    steps = []
    with pytest.raises(FlashMoeError, match="generation step 3: the model's logits are not finite"):
        for step in stream_generate(model, tokenizer, [3, 4, 5], max_tokens=10, temperature=temperature):
            steps.append(step.token)
    assert len(steps) == 3 and (temperature or steps == [6, 7, 8])  # the finite steps were delivered


def test_non_finite_logits_at_the_first_step(tokenizer):
    with pytest.raises(FlashMoeError, match="generation step 0"):
        generate(NanAfter(50, at=0), tokenizer, [3, 4], max_tokens=3)


def test_a_checkpoint_with_nan_weights(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(default_model_dir(), folder)
    shard = next(folder.glob("*.safetensors"))
    tensors = read_tensors(folder)
    tensors["model.norm.weight"] = mx.full(
        tensors["model.norm.weight"].shape, float("nan"), tensors["model.norm.weight"].dtype
    )
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    model, tok = flashmoe.load(folder)
    with pytest.raises(FlashMoeError, match="generation step 0"):
        generate(model, tok, "def f(x):", max_tokens=4)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(temperature=float("inf")), "temperature=inf"),
        (dict(temperature=-1), "temperature=-1"),
        (dict(top_p=0), "top_p=0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(top_p=float("nan")), "top_p=nan"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(top_k=2.5), "top_k=2.5"),
        (dict(top_k="3"), "top_k=3"),
        (dict(temperature=True), "temperature=True"),
    ],
)
def test_make_sampler_refuses(kwargs, words):
    with pytest.raises(FlashMoeError, match="sampling needs") as info:
        make_sampler(**kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(seed=-1), "seed must be an integer >= 0; got -1"),
        (dict(seed=1.5), "seed must be"),
        (dict(seed=2**64), "seed must be below 2**64"),
        (dict(max_tokens=-1), "max_tokens must be"),
        (dict(max_tokens=2.0), "max_tokens must be"),
        (dict(prefill_chunk=0), "prefill_chunk must be"),
        (dict(temperature=float("nan")), "temperature=nan"),
    ],
)
def test_stream_generate_refuses(tokenizer, kwargs, words):
    with pytest.raises(FlashMoeError) as info:
        generate(MockModel(50), tokenizer, [3, 4], **kwargs)
    assert words in str(info.value)
