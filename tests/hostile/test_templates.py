"""Chat templates are bounded in time and output, and every failure is one FlashMoeError naming the file."""

from __future__ import annotations

import json
import time

import pytest

import flashmoe.tokenizer as tokenizer_module
from flashmoe.errors import FlashMoeError
from flashmoe.tokenizer import Tokenizer
from tests.helpers import write_tiny_tokenizer

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def folder(tmp_path):
    return write_tiny_tokenizer(tmp_path / "tok")


def with_template(folder, template: str, in_jinja_file: bool = False) -> Tokenizer:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if in_jinja_file:
        config.pop("chat_template")
        (folder / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(folder)


@pytest.mark.parametrize(
    "template,words",
    [
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "took more than",
        ),
        ("{{ 'a' * 100000000 }}", "repetition"),
        ("{% for a in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output passed 1000000"),
        ("{{ 'a'.ljust(10**9) }}", "argument 1000000000"),
        ("{{ 2 ** 100000000 }}", "exponent"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{% for %}", "TemplateSyntaxError"),
        ("{{ messages.__class__.__mro__ }}", "SecurityError"),
        ("{{ messages[0].content.nope.deeper }}", "UndefinedError"),
        ("{{ strftime_now(5) }}", "TypeError"),
    ],
)
def test_hostile_templates_are_one_line_errors_naming_the_file(folder, monkeypatch, template, words):
    monkeypatch.setattr(tokenizer_module, "TEMPLATE_SECONDS", 1.0)
    tokenizer = with_template(folder, template)
    tic = time.perf_counter()
    with pytest.raises(FlashMoeError) as info:
        tokenizer.apply_chat_template(MESSAGES)
    message = str(info.value)
    assert time.perf_counter() - tic < 5
    assert "\n" not in message and str(folder / "tokenizer_config.json") in message and words in message, (
        message
    )


def test_the_jinja_file_is_named(folder):
    tokenizer = with_template(folder, "{{ 1 / 0 }}", in_jinja_file=True)
    with pytest.raises(FlashMoeError, match="chat_template.jinja: the chat template failed"):
        tokenizer.apply_chat_template(MESSAGES)


def test_an_ordinary_template_still_renders(folder):
    tokenizer = with_template(
        folder,
        "{% for m in messages %}<{{ m.role }}>{{ m.content | tojson }}{% endfor %}"
        "{% for i in range(3) %}{{ loop.index }}{% endfor %}",
    )
    assert tokenizer.apply_chat_template(MESSAGES) == '<user>"hi"123'
