"""Generation engine without weights: a mock model, a tiny byte-level BPE tokenizer trained here."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from flashmoe.errors import FlashMoeError
from flashmoe.generate import generate, stream_generate
from flashmoe.sample import make_sampler, top_k_filter, top_p_filter
from flashmoe.tokenizer import StreamingDetokenizer, Tokenizer
from tests.helpers import MULTIBYTE, MockModel, script_model

# --- tokenizer ---------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_gathers_eos_ids(tok, tiny_dir):
    (tiny_dir / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    try:
        with_config = Tokenizer.from_dir(tiny_dir)
    finally:
        (tiny_dir / "config.json").unlink()
    assert tok.decode(tok.encode(MULTIBYTE)) == MULTIBYTE
    assert tok.eos_token_ids == {
        0,
        2,
    }  # generation_config [2, 0] + tokenizer_config "<|im_end|>" (2)
    assert with_config.eos_token_ids == {0, 1, 2}


def test_missing_tokenizer_json_is_refused_with_the_path(tmp_path):
    with pytest.raises(FlashMoeError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


def test_chat_template_is_applied(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi é"}]
    text = tok.apply_chat_template(messages)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi é<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.encode(text)[0] == 1  # <|im_start|> is one special id
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")


@pytest.mark.parametrize("layout", ["named list", "named dict", "jinja file"])
def test_chat_template_is_found_in_every_layout(tiny_dir, tmp_path, layout):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    config = {"eos_token": "<|im_end|>"}
    if layout == "named list":
        config["chat_template"] = [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"},
        ]
    elif layout == "named dict":
        config["chat_template"] = {"tool_use": "T", "default": "D"}
    else:
        (folder / "chat_template.jinja").write_text("D")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "D"
    assert tok.eos_token_ids == {2}  # eos_token given as a plain string


def test_missing_chat_template_is_a_clear_error(tok):
    bare = Tokenizer(tok.backend, tok.eos_token_ids, chat_template=None, source="/models/x")
    with pytest.raises(FlashMoeError, match="/models/x.*no chat_template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_streaming_detokenizer_never_emits_a_partial_character(tok):
    ids = tok.encode(MULTIBYTE)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs a character split across ids"
    detok = StreamingDetokenizer(tok)
    pieces = [detok.add_token(i) for i in ids] + [detok.finalize()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == MULTIBYTE


def test_streaming_detokenizer_flushes_a_trailing_partial_character(tok):
    ids = tok.encode(MULTIBYTE)
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))  # ends mid-character
    detok = StreamingDetokenizer(tok)
    pieces = [detok.add_token(i) for i in ids[:cut]]
    assert pieces[-1] == ""  # held back ...
    tail = detok.finalize()
    assert tail.endswith("\ufffd")  # ... until the end, where it is flushed as decode() shows it
    assert "".join(pieces) + tail == tok.decode(ids[:cut])


# --- sampling ----------------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = mx.array([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert make_sampler()(logits).tolist() == [1, 0]


def test_top_k_and_top_p_filters_keep_the_right_ids():
    logits = mx.log(mx.array([[0.5, 0.05, 0.3, 0.15]]))
    assert mx.isfinite(top_k_filter(logits, 2)).tolist() == [[True, False, True, False]]
    assert mx.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, False, True, False]]
    assert mx.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert mx.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, False, True, True]]


def test_sampling_draws_only_kept_ids():
    logits = mx.broadcast_to(mx.log(mx.array([0.5, 0.05, 0.3, 0.15])), (2000, 4))
    mx.random.seed(3)
    drawn = set(make_sampler(temperature=1.0, top_k=2)(logits).tolist())
    assert drawn == {0, 2}


def test_bad_sampling_settings_are_refused():
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(FlashMoeError):
            make_sampler(**bad)


# --- generation --------------------------------------------------------------------------------------------


def test_streamed_text_equals_decode_of_the_tokens(tok):
    prompt = tok.encode("Hello")
    script = tok.encode(MULTIBYTE) + [2]
    steps = list(stream_generate(script_model(tok, len(prompt), script), tok, prompt, max_tokens=50))
    tokens = [s.token for s in steps]
    assert tokens == script  # EOS is the last step ...
    assert steps[-1].finish_reason == "stop" and steps[-1].text == ""  # ... and adds no text
    assert all(s.finish_reason is None for s in steps[:-1])
    assert "".join(s.text for s in steps) == tok.decode(tokens[:-1]) == MULTIBYTE
    assert all("\ufffd" not in s.text for s in steps)


def test_eos_stops_generation(tok):
    prompt = tok.encode("Hi")
    model = script_model(tok, len(prompt), [10, 11, 0, 12, 13])  # 0 is an EOS id from generation_config
    steps = list(stream_generate(model, tok, prompt, max_tokens=20))
    assert [s.token for s in steps] == [10, 11, 0]
    assert [s.generation_tokens for s in steps] == [1, 2, 3]
    assert generate(model, tok, prompt, max_tokens=20) == tok.decode([10, 11])


def test_max_tokens_ends_with_length(tok):
    model = MockModel(tok.vocab_size)
    steps = list(stream_generate(model, tok, [40], max_tokens=5))
    assert [s.token for s in steps] == [41, 42, 43, 44, 45]
    assert steps[-1].finish_reason == "length" and steps[-1].generation_tokens == 5
    assert steps[-1].prompt_tokens == 1 and steps[-1].prompt_tps > 0 and steps[-1].peak_memory_gb >= 0


def test_prompt_as_text_or_ids_gives_the_same_result(tok):
    text = "The quick brown fox"
    model = MockModel(tok.vocab_size)
    assert generate(model, tok, text, max_tokens=6) == generate(model, tok, tok.encode(text), max_tokens=6)
    last = tok.encode(text)[-1]
    assert [s.token for s in stream_generate(model, tok, text, max_tokens=3)] == [
        last + 1,
        last + 2,
        last + 3,
    ]


def test_empty_prompt_is_refused(tok):
    with pytest.raises(FlashMoeError, match="empty"):
        list(stream_generate(MockModel(tok.vocab_size), tok, [], max_tokens=3))


@pytest.mark.parametrize("prompt_len, chunk", [(10, 4), (9, 4), (1, 4), (7, 512), (6, 1)])
def test_chunked_prefill_feeds_every_prompt_token_once_in_order(tok, prompt_len, chunk):
    prompt = [20 + i for i in range(prompt_len)]
    model = MockModel(tok.vocab_size)
    cache = model.make_cache()
    model.make_cache = lambda: cache
    steps = list(stream_generate(model, tok, prompt, max_tokens=4, prefill_chunk=chunk))
    generated = [s.token for s in steps]
    assert cache[0].fed == prompt + generated[:-1]  # the last token is never fed: generation stopped there
    body = prompt_len - 1  # prefill covers all but the last prompt id; the last one yields the first logits
    expected_chunks = [min(chunk, body - s) for s in range(0, body, chunk)]
    assert model.calls == expected_chunks + [1, 1, 1, 1]
    assert cache[0].state_reads == len(expected_chunks)  # each chunk's graph is evaluated before the next


def test_seeded_sampling_is_reproducible(tok):
    model = MockModel(tok.vocab_size)

    def run(seed: int) -> list[int]:
        return [s.token for s in stream_generate(model, tok, [5], max_tokens=24, temperature=1.0, seed=seed)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(7) != [6 + i for i in range(24)]  # not greedy in disguise


def test_top_k_1_equals_greedy(tok):
    model = MockModel(tok.vocab_size)
    greedy = [s.token for s in stream_generate(model, tok, [5], max_tokens=12)]
    topk1 = [
        s.token for s in stream_generate(model, tok, [5], max_tokens=12, temperature=0.8, top_k=1, seed=3)
    ]
    assert topk1 == greedy == [6 + i for i in range(12)]
