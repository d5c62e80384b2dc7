"""`python -m flashmoe`: parse arguments, load a model, stream its text to stdout and the statistics to stderr."""

from __future__ import annotations

import argparse
import math
import secrets
import sys
from contextlib import nullcontext
from pathlib import Path

from . import hub, timing
from .errors import FlashMoeError
from .generate import format_stats, stream_generate
from .kernels import BACKENDS
from .loader import default_model_dir
from .streaming.stats import format_stream_stats
from .timing import format_timing

DEFAULT_PROMPT = "def fibonacci(n):"
NO_DEFAULT_MODEL = (
    "this install has no bundled default model; pass --model PATH (an MLX model folder) "
    "or --model OWNER/NAME (a Hugging Face id)"
)
CHAT_MODELS = (
    "models whose tokenizer_config.json has a chat_template or that ship a chat_template.jinja "
    "(instruct and chat models, e.g. mlx-community/Qwen3-Coder-Next-4bit); the bundled "
    "flashmoe-coder-tiny is a plain Python-code model with no template"
)


class UsageError(Exception):
    """Bad command-line arguments."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block and exit; one line is enough
        raise UsageError(message)


def _number(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: `kind` within [low, high] ((low, high] when low_open)."""

    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            if high is None:
                bound = f"greater than {low}" if low_open else f"at least {low}"
            else:
                bound = f"{'greater than' if low_open else 'at least'} {low} and at most {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none to show (None, off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m flashmoe`."""
    p = _Parser(
        prog="flashmoe",
        formatter_class=_Formatter,
        description="Generate text with a quantized MoE model on MLX. The prompt is echoed on stderr, "
        "the completion streams to stdout, the statistics follow on stderr.",
    )
    p.add_argument(
        "--model",
        help="MLX model folder (config.json, *.safetensors, tokenizer.json) or a Hugging Face "
        "id such as mlx-community/Qwen3-Coder-Next-4bit (the cache first, else a download; "
        "a local folder of that name wins); default: the bundled flashmoe-coder-tiny",
    )
    p.add_argument("--prompt", help=f"prompt text, or - to read stdin (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--max-tokens", type=_number(int, 1), default=100, help="most tokens to generate")
    p.add_argument("--temp", type=_number(float, 0.0), default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument(
        "--top-p",
        type=_number(float, 0.0, 1.0, low_open=True),
        default=1.0,
        help="nucleus sampling: keep the most likely tokens up to this probability mass",
    )
    p.add_argument(
        "--top-k",
        type=_number(int, 0),
        default=0,
        help="keep the k most likely tokens; 0 keeps all",
    )
    p.add_argument(
        "--seed",
        type=_number(int, 0, 2**64 - 1),
        default=None,
        help="random seed for sampling (default: with --temp > 0, a fresh one, printed with the stats)",
    )
    p.add_argument(
        "--k", type=_number(int, 1), default=None, help="experts per token (default: the config's)"
    )
    p.add_argument("--backend", choices=["auto", *BACKENDS], default="auto", help="dequantization kernels")
    p.add_argument(
        "--quant",
        choices=["config", "global"],
        default="config",
        help="per-layer quantization from config.json, or 'global': every tensor read at the top-level "
        "bits, the 4-bit-only engine's bug, on purpose",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help=f"wrap the prompt in the model's chat template; works with {CHAT_MODELS}",
    )
    p.add_argument("--system", help="system message (needs --chat)")
    p.add_argument(
        "--timing",
        action="store_true",
        help="print a per-phase time table (and the weight bandwidth) to stderr",
    )
    p.add_argument(
        "--stream-experts",
        action="store_true",
        help="read the selected experts from disk per layer instead of loading them (models larger than memory)",
    )
    p.add_argument(
        "--expert-cache-mb",
        type=_number(float, 0.0),
        default=None,
        help="with --stream-experts: an LRU of recently used experts, in MB (default: 0, the OS page cache alone)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars and no prompt echo (bars are drawn only when stderr is a terminal anyway)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="expert parallelism over the processes mlx.launch started (mx.distributed.init()): each rank "
        "holds 1/N of the experts; only rank 0 prints (docs/DISTRIBUTED.md)",
    )
    return p


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt text: --prompt, stdin for '-', or the default."""
    if args.prompt == "-":
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompt -: stdin is not UTF-8 ({e.reason} at byte {e.start})") from None
    return DEFAULT_PROMPT if args.prompt is None else args.prompt


def _chat_prompt(tokenizer, args: argparse.Namespace, prompt: str) -> str:
    """The prompt as the chat template renders a (system +) user turn."""
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages.append({"role": "user", "content": prompt})
    if getattr(tokenizer, "chat_template", "") is None:
        source = getattr(tokenizer, "source", None) or args.model or "the bundled model"
        raise FlashMoeError(
            f"--chat: {source} has no chat_template (not in tokenizer_config.json, no "
            f"chat_template.jinja); --chat works with {CHAT_MODELS}: drop --chat to continue "
            "the prompt as plain text"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _check(args: argparse.Namespace) -> None:
    """Argument combinations argparse cannot express."""
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    if args.expert_cache_mb is not None and not args.stream_experts:
        raise UsageError("--expert-cache-mb needs --stream-experts")
    if args.model is None and default_model_dir() is None:
        raise UsageError(NO_DEFAULT_MODEL)
    if args.model is not None and not Path(args.model).exists() and not hub.is_repo_id(args.model):
        raise UsageError(
            f"--model {args.model}: no such file or directory (nor a Hugging Face id owner/name)"
        )


def run(args: argparse.Namespace) -> int:
    """Load the model, stream the text to stdout and the statistics to stderr."""
    from .loader import load

    prompt = _read_prompt(args)
    seed = args.seed
    if seed is None:  # greedy decoding draws nothing; sampling gets a fresh seed, printed to repeat the run
        seed = secrets.randbits(32) if args.temp > 0 else 0
    options = {"stream_experts": True, "expert_cache_mb": args.expert_cache_mb} if args.stream_experts else {}
    if args.quiet:
        options["progress"] = False
    if args.distributed:
        options["group"] = _distributed_group()
    model, tokenizer = load(args.model, backend=args.backend, quant=args.quant, k=args.k, **options)
    report = getattr(model, "report", None)
    if args.quant == "global":
        _say_global(report)
    if args.chat:
        prompt = _chat_prompt(tokenizer, args, prompt)
    if not args.quiet:
        sys.stderr.write(prompt)  # the completion continues it on stdout: nothing starts mid-line
        sys.stderr.flush()
    step = None
    with timing.timing() if args.timing else nullcontext() as timer:
        for step in stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            temperature=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=seed,
        ):
            sys.stdout.write(step.text)
            sys.stdout.flush()
    print(flush=True)
    weight_bytes, streamed = _weight_bytes(report)
    if step is not None:
        print("=" * 10 + "\n" + format_stats(step, weight_bytes, streamed), file=sys.stderr)
        if args.temp > 0:
            how = "given" if args.seed is not None else "drawn at random"
            print(f"Seed: {seed} ({how}; --seed {seed} repeats this run)", file=sys.stderr)
    if timer is not None:
        print(format_timing(timer, weight_bytes), file=sys.stderr)
        stats = getattr(report, "stream_stats", None)
        if stats is not None:
            print(format_stream_stats(stats), file=sys.stderr)
    return 0


def _say_global(report) -> None:
    """--quant global on stderr: what it does on purpose, and how many tensors it misreads."""
    misread = getattr(report, "misread_modules", None)
    count = (
        f"{len(misread)} quantized modules stored at other bits are misread"
        if misread is not None
        else "modules stored at other bits are misread"
    )
    print(
        f"flashmoe: --quant global deliberately reads every quantized tensor at the config's top-level bits, "
        f"as the 4-bit-only engine did (the bug): {count} (model.report.misread_modules)",
        file=sys.stderr,
    )


def _weight_bytes(report) -> tuple[float | None, bool]:
    """Weight bytes a decode step reads: the loader's figure; with streaming, the non-expert bytes plus the
    expert bytes actually read per decoded token. (None, False) when the model has no report."""
    figures = getattr(report, "bytes_per_token", None) or {}
    if not figures:
        return None, False
    stats = getattr(report, "stream_stats", None)
    decode = stats.summary()["decode"] if stats is not None else {}
    if decode:
        return figures["dense"] + decode["bytes_per_token"], True
    return figures["total"], False


def _distributed_group():
    """--distributed: the group mlx.launch set up; ranks other than 0 print nothing (text and stats)."""
    import os

    import mlx.core as mx

    group = mx.distributed.init()
    if group.rank() != 0:
        devnull = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
        sys.stdout = sys.stderr = devnull
    return group


def main(argv: list[str] | None = None) -> int:
    """Entry point: the exit status (0 done, 1 error while running, 2 bad arguments, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        _check(args)
        return run(args)
    except UsageError as e:
        print(f"flashmoe: error: {e}", file=sys.stderr)
        return 2
    except (FlashMoeError, OSError) as e:
        print(f"flashmoe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nflashmoe: interrupted", file=sys.stderr)
        return 130
    except (
        RuntimeError,
        MemoryError,
        ValueError,
    ) as e:  # MLX and the tokenizer raise these: one line, not a trace
        print(
            f"flashmoe: error: {type(e).__name__}: {' '.join(str(e).split())[:500]}",
            file=sys.stderr,
        )
        return 1
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
