"""Checkpoints that flashmoe loads as they are and that training resumes from exactly.

    DIR/config.json, tokenizer.json, tokenizer_config.json
    DIR/model-0000k-of-0000n.safetensors + model.safetensors.index.json   float32 weights
    DIR/train_state/optimizer-0000k-of-0000n.safetensors                   AdamW moments + step
    DIR/train_state/state.json                                             step, data position, settings
    DIR/log.jsonl                                                          appended by train.py

Every shard stays under MAX_SHARD_BYTES (the device's per-file limit is 16 MiB). A save is
written to DIR/.incoming first and moved in with state.json last, so an interrupted save
leaves either the old checkpoint or a complete new one (finished on the next load).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx

from flashmoe.safetensors import save_shards

MAX_SHARD_BYTES = 15 * 2**20  # the device's per-file limit is 16 MiB
STATE_DIR = "train_state"
INCOMING = ".incoming"


def load_shards(folder: Path, prefix: str) -> dict[str, mx.array]:
    """Every tensor of `folder`/`prefix`-*.safetensors."""
    files = sorted(Path(folder).glob(f"{prefix}-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no {prefix}-*.safetensors shards")
    tensors = {}
    for file in files:
        tensors.update(mx.load(str(file)))
    return tensors


def save(out: Path, params: dict, opt_state: dict, state: dict, config: dict, tokenizer_dir: Path) -> None:
    """Write the whole checkpoint to `out` (see the module docstring)."""
    out = Path(out)
    incoming = out / INCOMING
    shutil.rmtree(incoming, ignore_errors=True)
    (incoming / STATE_DIR).mkdir(parents=True)
    save_shards(params, incoming, "model", MAX_SHARD_BYTES)  # with model.safetensors.index.json
    moments = {f"{kind}.{k}": v for kind in ("m", "v") for k, v in opt_state[kind].items()}
    save_shards({**moments, "step": opt_state["step"]}, incoming / STATE_DIR, "optimizer", MAX_SHARD_BYTES)
    (incoming / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tokenizer_dir) / name, incoming / name)
    (incoming / STATE_DIR / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    _move_in(out)


def _move_in(out: Path) -> None:
    """Replace the checkpoint in `out` by the complete one in out/.incoming; state.json goes last."""
    incoming = out / INCOMING
    (out / STATE_DIR / "state.json").unlink(missing_ok=True)  # from here on the old checkpoint is invalid
    for old in [
        *out.glob("model-*.safetensors"),
        *(out / STATE_DIR).glob("optimizer-*.safetensors"),
    ]:
        old.unlink()
    (out / STATE_DIR).mkdir(exist_ok=True)
    for path in sorted(incoming.rglob("*")):
        if path.is_file() and path.name != "state.json":
            path.replace(out / path.relative_to(incoming))
    (incoming / STATE_DIR / "state.json").replace(out / STATE_DIR / "state.json")
    shutil.rmtree(incoming)


def exists(out: Path) -> bool:
    """Whether `out` holds a checkpoint to resume (a complete .incoming one counts)."""
    out = Path(out)
    return (out / STATE_DIR / "state.json").is_file() or (out / INCOMING / STATE_DIR / "state.json").is_file()


def read_state(out: Path) -> dict:
    """state.json of the checkpoint in `out` ({} when there is none)."""
    path = Path(out) / STATE_DIR / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load(out: Path) -> tuple[dict, dict, dict]:
    """(params, optimizer state, state.json) of the checkpoint in `out`."""
    out = Path(out)
    if (
        not (out / STATE_DIR / "state.json").is_file()
        and (out / INCOMING / STATE_DIR / "state.json").is_file()
    ):
        _move_in(out)  # a save that was interrupted after it was complete
    if not (out / STATE_DIR / "state.json").is_file():
        raise FileNotFoundError(f"{out / STATE_DIR / 'state.json'}: no checkpoint to resume")
    state = json.loads((out / STATE_DIR / "state.json").read_text())
    params = load_shards(out, "model")
    saved = load_shards(out / STATE_DIR, "optimizer")
    opt_state = {"m": {}, "v": {}, "step": saved.pop("step")}
    for key, value in saved.items():
        kind, name = key.split(".", 1)
        opt_state[kind][name] = value
    return params, opt_state, state
