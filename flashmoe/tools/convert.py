"""Float checkpoint -> the MLX format mlx-lm's `convert` writes (affine, bf16 scales and biases).

    python -m flashmoe.tools.convert SRC DST [--bits 4] [--group-size 64] [--override PATTERN=BITS ...]
                                             [--force] [--quiet]

By default every linear layer, the embedding and the stacked experts are stored at 4 bits
with groups of 64, and the routers (`mlp.gate`, `mlp.shared_expert_gate`) at 8 bits, as
mlx-lm does for these models. Overrides name modules by a substring or regular expression
(`switch_mlp=2` gives 2-bit experts, `mlp.gate=4` reproduces an all-4-bit router). Modules
stored at other than the top-level settings are listed in config.json under both
"quantization" and "quantization_config". An override that matches no module is refused, as is
a non-empty DST (unless --force); a failed conversion leaves no DST behind.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import mlx.core as mx

from ..errors import FlashMoeError
from ..loader import check_checkpoint, read_config
from ..progress import progress_bar, shown
from ..quant import QuantSpec, quantization_section, resolve, with_section
from ..safetensors import read_tensors, save_shards
from . import HelpFormatter, add_output_options, output_directory

ROUTERS = (r"mlp\.gate$", r"shared_expert_gate$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def quantizable(name: str, value: mx.array) -> bool:
    """Linear, embedding and stacked-expert weights; not norms, convolutions or per-head vectors."""
    return name.endswith(".weight") and value.ndim >= 2 and "conv1d" not in name and "norm" not in name


class Override(tuple):
    """(pattern, bits), as --override PATTERN=BITS gives it; `text` is what was typed (for messages)."""

    def __new__(cls, pattern: str, bits: int, text: str | None = None):
        override = super().__new__(cls, (pattern, bits))
        override.text = text or f"{pattern}={bits}"
        return override


def plan_specs(tensors: dict, default: QuantSpec, overrides: list[tuple[str, int]]) -> dict[str, QuantSpec]:
    """module -> spec for every quantizable weight; later overrides win; an override matching nothing is refused."""
    rules = [(pattern, 8) for pattern in ROUTERS] + list(overrides)
    specs, matched = {}, set()
    for name, value in tensors.items():
        if not quantizable(name, value):
            continue
        module, bits = name[: -len(".weight")], default.bits
        for index, (pattern, rule_bits) in enumerate(rules):
            if re.search(pattern, module):
                bits = rule_bits
                matched.add(index)
        if value.shape[-1] % default.group_size:
            raise FlashMoeError(
                f"'{name}' has {value.shape[-1]} inputs, not a multiple of group size {default.group_size}"
            )
        specs[module] = QuantSpec(bits, default.group_size)
    for index, override in enumerate(overrides, start=len(ROUTERS)):
        if index not in matched:
            text = getattr(override, "text", f"{override[0]}={override[1]}")
            example = next(iter(specs), "none")
            raise FlashMoeError(
                f"--override {text}: the pattern {override[0]!r} matches no quantizable module "
                f"(module names look like {example!r})"
            )
    return specs


def quantize_tensors(
    tensors: dict, specs: dict[str, QuantSpec], progress: bool | None = False
) -> dict[str, mx.array]:
    """weight -> (weight, scales, biases) for planned modules, everything else in bf16 (A_log kept float32).

    `progress` (None: when stderr is a terminal): a bar over the source bytes, each tensor computed in turn.
    """
    out, eager = {}, shown(progress)
    with progress_bar(
        total=sum(v.nbytes for v in tensors.values()), desc="quantizing", unit="B", enabled=progress
    ) as bar:
        for name, value in tensors.items():
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module in specs:
                spec = specs[module]
                w, scales, biases = mx.quantize(
                    value.astype(mx.bfloat16), group_size=spec.group_size, bits=spec.bits
                )
                new = {
                    f"{module}.weight": w,
                    f"{module}.scales": scales,
                    f"{module}.biases": biases,
                }
            elif mx.issubdtype(value.dtype, mx.floating) and not name.endswith("A_log"):
                new = {name: value.astype(mx.bfloat16)}
            else:
                new = {name: value}
            out.update(new)
            if eager:
                mx.eval(list(new.values()))  # computed now, so the bar moves with the work
            bar.update(value.nbytes)
    return out


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    bits: int = 4,
    group_size: int = 64,
    overrides: list[tuple[str, int]] = (),
    force: bool = False,
    progress: bool | None = False,
) -> Path:
    """Write the quantized checkpoint of `src` to `dst` and check it; returns dst.

    `dst` must be new or empty (`force`: an earlier checkpoint there is replaced); on an error nothing
    is left in it. `progress` (None: when stderr is a terminal): a bar while quantizing.
    """
    src, dst = Path(src), Path(dst)
    config = read_config(src)
    if resolve(config).default is not None:
        raise FlashMoeError(f"{src}/config.json: the checkpoint is already quantized")
    tensors = read_tensors(src)
    default = QuantSpec(bits, group_size)
    specs = plan_specs(tensors, default, list(overrides))
    with output_directory(dst, force, sources=(src,)):
        save_shards(quantize_tensors(tensors, specs, progress), dst)
        config = with_section(config, quantization_section(specs, default))
        (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        _copy_tokenizer(src, dst, config)
        check_checkpoint(dst)  # the result must pass the same shape check every load does
    return dst


def _copy_tokenizer(src: Path, dst: Path, config: dict) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    generation = src / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, dst / "generation_config.json")
    elif "eos_token_id" in config:
        (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": config["eos_token_id"]}))


BITS_CHOICES = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantization takes
GROUP_SIZE_CHOICES = (32, 64, 128)


def _override(text: str) -> tuple[str, int]:
    pattern, _, bits = text.rpartition("=")
    if not pattern or not bits.isdigit():
        raise argparse.ArgumentTypeError(f"expected PATTERN=BITS (e.g. switch_mlp=2), found {text!r}")
    if int(bits) not in BITS_CHOICES:
        raise argparse.ArgumentTypeError(f"{text!r}: bits must be one of {', '.join(map(str, BITS_CHOICES))}")
    try:
        re.compile(pattern)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {pattern!r} is not a valid pattern ({err})") from None
    return Override(
        re.escape(pattern) if not any(c in pattern for c in "^$[]()*+?\\") else pattern,
        int(bits),
        text,
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: parse, convert, report."""
    parser = argparse.ArgumentParser(
        prog="python -m flashmoe.tools.convert",
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "src",
        help="a float checkpoint directory (config.json and *.safetensors, e.g. a Hugging Face download)",
    )
    parser.add_argument("dst", help="a new (or empty) directory for the quantized checkpoint")
    parser.add_argument(
        "--bits",
        type=int,
        default=4,
        choices=BITS_CHOICES,
        help="bits of every quantized module the routers and --override leave alone",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=64,
        choices=GROUP_SIZE_CHOICES,
        help="weights per scale and bias",
    )
    parser.add_argument(
        "--override",
        type=_override,
        action="append",
        default=[],
        metavar="PATTERN=BITS",
        help="modules whose name contains PATTERN (a substring or a regular expression) at BITS, "
        "e.g. switch_mlp=2 (2-bit experts) or mlp.gate=4 (the all-4-bit router); repeatable, "
        "later ones win; a pattern matching no module is refused",
    )
    add_output_options(parser, "DST")
    args = parser.parse_args(argv)
    try:
        out = convert(
            args.src,
            args.dst,
            bits=args.bits,
            group_size=args.group_size,
            overrides=args.override,
            force=args.force,
            progress=False if args.quiet else None,
        )
    except (FlashMoeError, OSError) as err:
        print(f"flashmoe.tools.convert: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
