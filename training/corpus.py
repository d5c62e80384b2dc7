"""The training corpus: the running interpreter's standard library, split by whole file.

    stdlib .py files (no test suites, no site-packages), sorted
      -> held out when sha256(relative path) falls in the first 2% (fixed per path, any machine)
      -> tokenized, each file preceded by <|endoftext|>
      -> data/train.bin, data/heldout.bin (uint16 ids), data/manifest.json, heldout_files.txt

Run after the tokenizer exists: `python -m training.tokenizer && python -m training.corpus`.
The files differ between Python versions, so the manifest records the version and each .bin's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sysconfig
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
# the one copy of tokenizer.json, tokenizer_config.json: beside the bundled model
ASSETS_DIR = HERE.parent / "flashmoe" / "assets" / "flashmoe-coder-tiny"
HELDOUT_LIST = HERE / "heldout_files.txt"
EOS = "<|endoftext|>"
HELDOUT_FRACTION = 0.02

# Directories never read: test suites (the brief's choice), installed packages, caches.
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
# Files that are not hand-written Python: build-machine paths, generated documentation text.
SKIP_FILES = ("_sysconfigdata_", "pydoc_data/topics.py")


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def collect_files(root: Path) -> list[str]:
    """Relative POSIX paths of the library's .py files, sorted, test suites and generated files left out."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        name = rel.as_posix()
        if any(name.startswith(s) or name == s for s in SKIP_FILES):
            continue
        files.append(name)
    return sorted(files)


def is_heldout(rel: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether file `rel` is held out: decided by its path's hash alone, so the split never drifts."""
    bucket = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) / 16**8  # uniform in [0, 1)
    return bucket < fraction


def split(files: list[str], fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(train, held-out) file lists, each in the input's order."""
    heldout = [f for f in files if is_heldout(f, fraction)]
    chosen = set(heldout)
    return [f for f in files if f not in chosen], heldout


def read_sources(root: Path, files: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """({path: text}, {path: why skipped}) for files that decode as UTF-8."""
    texts, skipped = {}, {}
    for rel in files:
        try:
            texts[rel] = (root / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            skipped[rel] = f"not UTF-8 ({err.reason})"
    return texts, skipped


def encode_documents(tokenizer, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """All texts as one uint16 stream, each preceded by EOS; also each document's token count."""
    eos = tokenizer.token_to_id(EOS)
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    counts = [len(e.ids) for e in encodings]
    stream = np.empty(sum(counts) + len(counts), dtype=np.uint16)
    pos = 0
    for enc in encodings:
        stream[pos] = eos
        stream[pos + 1 : pos + 1 + len(enc.ids)] = enc.ids
        pos += 1 + len(enc.ids)
    return stream, counts


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build(
    out_dir: Path = DATA_DIR,
    assets: Path = ASSETS_DIR,
    root: Path | None = None,
    fraction: float = HELDOUT_FRACTION,
    heldout_list: Path | None = HELDOUT_LIST,
) -> dict:
    """Write train.bin, heldout.bin and manifest.json to `out_dir` (and `heldout_list`); return the manifest."""
    from tokenizers import Tokenizer

    root = Path(root or stdlib_root())
    tokenizer = Tokenizer.from_file(str(assets / "tokenizer.json"))
    if tokenizer.get_vocab_size() > 65536:
        raise ValueError(f"{assets / 'tokenizer.json'}: {tokenizer.get_vocab_size()} ids do not fit uint16")
    texts, skipped = read_sources(root, collect_files(root))
    train, heldout = split(list(texts), fraction)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "python": platform.python_version(),
        "stdlib": str(root),
        "heldout_fraction": fraction,
        "tokenizer_sha256": sha256_file(assets / "tokenizer.json"),
        "skipped": skipped,
    }
    for name, files in (("train", train), ("heldout", heldout)):
        stream, counts = encode_documents(tokenizer, [texts[f] for f in files])
        path = out_dir / f"{name}.bin"
        stream.tofile(path)
        manifest[name] = {
            "file": path.name,
            "tokens": int(stream.size),
            "documents": len(files),
            "bytes_of_source": sum(len(texts[f].encode()) for f in files),
            "sha256": sha256_file(path),
            "files": dict(zip(files, counts)),
        }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if heldout_list is not None:
        Path(heldout_list).write_text("".join(f + "\n" for f in heldout))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="where train.bin / heldout.bin go")
    parser.add_argument("--assets", type=Path, default=ASSETS_DIR, help="folder holding tokenizer.json")
    parser.add_argument(
        "--stdlib", type=Path, default=None, help="library folder (default: this interpreter's)"
    )
    args = parser.parse_args(argv)
    m = build(args.out, args.assets, args.stdlib)
    for name in ("train", "heldout"):
        s = m[name]
        print(
            f"{name:8s} {s['documents']:4d} files  {s['bytes_of_source']:>10,d} bytes  {s['tokens']:>9,d} tokens "
            f"({s['bytes_of_source'] / s['tokens']:.2f} bytes/token)  {args.out / s['file']}"
        )
    if m["skipped"]:
        print(f"skipped {len(m['skipped'])} files: {m['skipped']}")


if __name__ == "__main__":
    main()
