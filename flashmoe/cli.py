"""`python -m flashmoe`: parse arguments, load a model, stream its text to stdout and the statistics to stderr."""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import nullcontext
from pathlib import Path

from . import timing
from .loader import default_model_dir
from .errors import FlashMoeError
from .kernels import BACKENDS
from .generate import format_stats, stream_generate
from .timing import format_timing
from .streaming.stats import format_stream_stats

DEFAULT_PROMPT = "def fibonacci(n):"
NO_DEFAULT_MODEL = "this install has no bundled default model; pass --model PATH (an MLX model folder)"


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
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m flashmoe`."""
    p = _Parser(prog="flashmoe", description="Generate text with a quantized MoE model on MLX.")
    p.add_argument("--model", help="MLX model folder (config.json, *.safetensors, tokenizer.json); "
                                   "default: the bundled flashmoe-coder-tiny")
    p.add_argument("--prompt", help=f"prompt text, or - to read stdin (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--max-tokens", type=_number(int, 1), default=100, help="most tokens to generate")
    p.add_argument("--temp", type=_number(float, 0.0), default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=_number(float, 0.0, 1.0, low_open=True), default=1.0, help="nucleus sampling")
    p.add_argument("--top-k", type=_number(int, 0), default=0, help="keep the k most likely tokens; 0 keeps all")
    p.add_argument("--seed", type=_number(int, 0, 2**64 - 1), default=0, help="random seed for sampling")
    p.add_argument("--k", type=_number(int, 1), default=None, help="experts per token (default: the config's)")
    p.add_argument("--backend", choices=["auto", *BACKENDS], default="auto")
    p.add_argument("--quant", choices=["config", "global"], default="config",
                   help="per-layer quantization from config.json, or its global setting only")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", help="system message (needs --chat)")
    p.add_argument("--timing", action="store_true", help="print a per-phase time table to stderr")
    p.add_argument("--stream-experts", action="store_true",
                   help="read the selected experts from disk per layer instead of loading them (models larger than memory)")
    p.add_argument("--expert-cache-mb", type=_number(float, 0.0), default=None,
                   help="with --stream-experts: an LRU of recently used experts, in MB (default 0: the OS page cache alone)")
    p.add_argument("--distributed", action="store_true",
                   help="expert parallelism over the processes mlx.launch started (mx.distributed.init()): each rank "
                        "holds 1/N of the experts; only rank 0 prints (docs/DISTRIBUTED.md)")
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
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _check(args: argparse.Namespace) -> None:
    """Argument combinations argparse cannot express."""
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    if args.expert_cache_mb is not None and not args.stream_experts:
        raise UsageError("--expert-cache-mb needs --stream-experts")
    if args.model is None and default_model_dir() is None:
        raise UsageError(NO_DEFAULT_MODEL)
    if args.model is not None and not Path(args.model).exists():
        raise UsageError(f"--model {args.model}: no such file or directory")


def run(args: argparse.Namespace) -> int:
    """Load the model, stream the text to stdout and the statistics to stderr."""
    from .loader import load

    prompt = _read_prompt(args)
    streaming = {"stream_experts": True, "expert_cache_mb": args.expert_cache_mb} if args.stream_experts else {}
    group = _distributed_group() if args.distributed else None
    model, tokenizer = load(args.model, backend=args.backend, quant=args.quant, k=args.k, group=group, **streaming)
    if args.chat:
        prompt = _chat_prompt(tokenizer, args, prompt)
    step = None
    with timing.timing() if args.timing else nullcontext() as timer:
        for step in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, temperature=args.temp,
                                    top_p=args.top_p, top_k=args.top_k, seed=args.seed):
            sys.stdout.write(step.text)
            sys.stdout.flush()
    print(flush=True)
    if step is not None:
        print("=" * 10 + "\n" + format_stats(step), file=sys.stderr)
    if timer is not None:
        print(format_timing(timer), file=sys.stderr)
        stats = model.report.stream_stats if getattr(model, "report", None) else None
        if stats is not None:
            print(format_stream_stats(stats), file=sys.stderr)
    return 0


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
    except (RuntimeError, MemoryError, ValueError) as e:  # MLX and the tokenizer raise these: one line, not a trace
        print(f"flashmoe: error: {type(e).__name__}: {' '.join(str(e).split())[:500]}", file=sys.stderr)
        return 1
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
