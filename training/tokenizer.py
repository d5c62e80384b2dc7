"""A byte-level BPE tokenizer for Python source, trained on the corpus's train split.

2048 ids: <|endoftext|> (id 0), the 256 byte symbols, then merges. Byte-level pre-tokenization
and decoding (GPT-2's scheme) mean any text round-trips exactly; runs of spaces stay together,
so indentation becomes a handful of tokens. Writes tokenizer.json and tokenizer_config.json beside the bundled model (corpus.ASSETS_DIR).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import ASSETS_DIR, EOS, collect_files, read_sources, split, stdlib_root

VOCAB_SIZE = 2048
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "eos_token": EOS,
    "pad_token": EOS,
    "add_bos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 4096,
}


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE with `vocab_size` ids (EOS and all 256 bytes included) trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so nothing is unknown
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def save(tokenizer: Tokenizer, folder: Path) -> None:
    """tokenizer.json and tokenizer_config.json in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="folder for tokenizer.json")
    parser.add_argument("--vocab", type=int, default=VOCAB_SIZE)
    parser.add_argument(
        "--stdlib", type=Path, default=None, help="library folder (default: this interpreter's)"
    )
    args = parser.parse_args(argv)
    root = args.stdlib or stdlib_root()
    texts, _ = read_sources(root, collect_files(root))
    train, _ = split(list(texts))
    tokenizer = train_tokenizer([texts[f] for f in train], args.vocab)
    save(tokenizer, args.out)
    print(f"{args.out / 'tokenizer.json'}: {tokenizer.get_vocab_size()} ids, trained on {len(train)} files")


if __name__ == "__main__":
    main()
