"""Text <-> token ids for a model folder: tokenizer.json, its EOS ids, its chat template, streaming decode."""

from __future__ import annotations

import functools
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from .errors import FlashMoeError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FlashMoeError(f"{path}: not valid JSON ({e})") from e


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> set[int]:
    """An eos_token_id field (int, list of ints or absent) as a set."""
    if isinstance(value, int):
        return {value}
    return {v for v in value if isinstance(v, int)} if isinstance(value, list) else set()


def _chat_template(folder: Path, config: dict) -> str | None:
    """tokenizer_config.json's chat_template (a string or named templates), else chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def _raise_exception(message: str) -> None:
    """Templates call raise_exception(...) to reject a conversation they cannot render."""
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **kwargs: Any) -> str:
    """JSON without HTML escaping, as transformers renders templates (jinja's own tojson escapes <, >, &)."""
    return json.dumps(value, ensure_ascii=False, indent=indent, **kwargs)


TEMPLATE_SECONDS = 5.0  # a chat template renders in milliseconds; more is a runaway loop
TEMPLATE_MAX_CHARS = 1_000_000  # a rendered prompt beyond this is not a prompt


class _TemplateLimit(Exception):
    """A chat template ran too long or rendered too much."""


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox with a deadline and a size bound, checked at every call, attribute access,
    loop step (range), string/list operator and output chunk; every such check is cheap."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.deadline = float("inf")

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise _TemplateLimit(f"rendering took more than {TEMPLATE_SECONDS:g} s")

    def call(self, __context, __obj, *args: Any, **kwargs: Any):
        self.check()
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > TEMPLATE_MAX_CHARS:
                raise _TemplateLimit(f"a call with the argument {value} (above {TEMPLATE_MAX_CHARS})")
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.check()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.check()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        self.check()
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise _TemplateLimit(f"an exponent of {right}")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(n, int)
                    and len(seq) * n > TEMPLATE_MAX_CHARS
                ):
                    raise _TemplateLimit(f"a repetition of {len(seq)} x {n} items")
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, (str, list, tuple)) and len(result) > TEMPLATE_MAX_CHARS:
            raise _TemplateLimit(f"a value of {len(result)} items (above {TEMPLATE_MAX_CHARS})")
        return result

    def range(self, *args: int):
        for i in safe_range(*args):
            self.check()
            yield i


def _environment() -> _BoundedEnvironment:
    """The same sandbox transformers renders chat templates in, so prompts match theirs (bounded in time and size)."""
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["range"] = env.range
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    """A model folder's tokenizer: encode, decode, EOS ids and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        eos_token_ids: set[int],
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        source: str = "tokenizer",
    ):
        self.backend = backend
        self.eos_token_ids = set(eos_token_ids)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # bos_token, eos_token, ... as text
        self.source = source  # where it was read from, for error messages
        self.template_source: str | None = None  # the file the chat template came from

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json, generation_config.json and config.json from `path`."""
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise FlashMoeError(
                f"{file}: no tokenizer.json; a model folder needs one to turn text into tokens"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise FlashMoeError(f"{file}: cannot be read as a tokenizer ({e})") from e
        config = _read_json(folder / "tokenizer_config.json")
        special = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        eos = _as_ids(_read_json(folder / "generation_config.json").get("eos_token_id"))
        eos |= _as_ids(_read_json(folder / "config.json").get("eos_token_id"))
        if "eos_token" in special and backend.token_to_id(special["eos_token"]) is not None:
            eos.add(backend.token_to_id(special["eos_token"]))
        template = _chat_template(folder, config)
        tokenizer = cls(backend, eos, template, special, source=str(folder))
        if template is not None:
            tokenizer.template_source = str(
                folder
                / (
                    "tokenizer_config.json"
                    if config.get("chat_template") is not None
                    else "chat_template.jinja"
                )
            )
        return tokenizer

    @functools.cached_property
    def vocab_size(self) -> int:
        """Rows an embedding needs for every id the tokenizer can produce: its largest id + 1 (added tokens
        included; the same as their count when the ids are contiguous, as they usually are)."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return max(max(vocab.values(), default=-1) + 1, self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no second BOS when the text (e.g. a rendered chat) already starts with one."""
        bos = self.special_tokens.get("bos_token")
        add_special = not (bos and text.startswith(bos))
        return self.backend.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens included (the caller decides which ids to drop, e.g. EOS)."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template."""
        if self.chat_template is None:
            raise FlashMoeError(
                f"{self.source}: tokenizer_config.json has no chat_template (and there is no chat_template.jinja); "
                "run without --chat"
            )
        where = self.template_source or self.source
        env = _environment()
        try:
            template = env.from_string(self.chat_template)
            env.deadline = time.monotonic() + TEMPLATE_SECONDS
            pieces, size = [], 0
            for piece in template.generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
                **extra,
            ):
                size += len(piece)
                if size > TEMPLATE_MAX_CHARS:
                    raise _TemplateLimit(f"the output passed {TEMPLATE_MAX_CHARS} characters")
                env.check()
                pieces.append(piece)
            return "".join(pieces)
        except _TemplateLimit as e:
            raise FlashMoeError(f"{where}: the chat template was stopped: {e}") from None
        except Exception as e:  # noqa: BLE001 (a template can raise anything: every failure is one line)
            message = " ".join(str(e).split())[:300] or type(e).__name__
            raise FlashMoeError(
                f"{where}: the chat template failed ({type(e).__name__}: {message})"
            ) from None

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming decoder for one generation."""
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns ids into text one at a time, never emitting half of a multi-byte character.

    Byte-level BPE pieces can end inside a UTF-8 character, which decodes to U+FFFD; such
    text is held back until a later piece completes it. Each increment is the difference
    between decoding from an already-emitted boundary with and without the new ids, so
    decoders that treat a word start specially (leading spaces) see their context.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.decode
        self.tokens: list[int] = []
        self._prefix = 0  # ids before here are emitted and no longer re-decoded
        self._read = 0  # ids before here are emitted

    def add_token(self, token: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        self.tokens.append(token)
        emitted = self._decode(self.tokens[self._prefix : self._read])
        text = self._decode(self.tokens[self._prefix :])
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return text[len(emitted) :]

    def finalize(self) -> str:
        """Whatever is still held back (a trailing partial character decodes as U+FFFD)."""
        emitted = self._decode(self.tokens[self._prefix : self._read])
        text = self._decode(self.tokens[self._prefix :])
        self._prefix = self._read = len(self.tokens)
        return text[len(emitted) :]
