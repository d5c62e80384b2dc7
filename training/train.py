"""Train the default model in chunks: `python -m training.train --out DIR --minutes 9 [--resume]`.

One call runs one chunk: it starts from seeded initial parameters (or, with --resume, from
DIR's checkpoint), takes AdamW steps along one warmup + cosine schedule of --total-steps
steps, stops early enough to score the held-out set and write a checkpoint before
--minutes run out, and appends JSON lines to DIR/log.jsonl. Two chunks of n steps give the
same parameters as one chunk of 2n: batches, schedule and optimizer state depend only on
the step. Settings are fixed by the first chunk and saved; a resumed chunk keeps them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from flashmoe.models.args import ModelArgs

from . import checkpoint
from .corpus import ASSETS_DIR, DATA_DIR
from .data import Batches, eval_windows, load_tokens, manifest
from .init import init_params
from .model_config import CONFIG
from .objective import check_params, evaluate, loss_terms
from .optim import AdamW, clip_by_global_norm, learning_rate

# --minutes counts from here (about when the process started): compilation is part of it
START = time.monotonic()
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
SAVE_RESERVE_S = 10.0  # seconds kept for writing the checkpoint (a few seconds for ~200 MB)
ROUTE_FIX = (
    "flashmoe.moe.MoE.route lets autodiff reach the expert ids: wrap its argpartition in "
    "mx.stop_gradient(...) (ids are discrete; the routing weights still get gradients)"
)


@dataclass
class Settings:
    """Everything that decides the numbers; fixed by the first chunk, saved in state.json."""

    batch: int = 32  # B, windows per step
    seq: int = 256  # T, tokens predicted per window
    lr: float = 3e-3  # peak learning rate
    final_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup: int = 200  # steps of linear warmup
    total_steps: int = 6000  # the schedule's length, over all chunks
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # global gradient-norm limit
    aux_coef: float = 0.01  # load-balancing loss weight (Switch Transformer)
    z_coef: float = 1e-3  # router z-loss weight (ST-MoE)
    seed: int = 0  # initial parameters and batch order
    dtype: str = "float32"  # compute dtype of the forward pass; master weights stay float32
    state_dtype: str = "float32"  # AdamW moments (bfloat16 halves the checkpoint)
    compile: bool = True  # mx.compile the training step
    eval_tokens: int = (
        65536  # held-out tokens scored at the end of each chunk (from the start of heldout.bin)
    )


def make_step(args: ModelArgs, s: Settings, opt: AdamW):
    """step(params, opt_state, tokens (B, T + 1), lr) -> (params, opt_state, metrics [ce, balance, z, grad norm])."""
    dtype = DTYPES[s.dtype]

    def loss_fn(params, tokens):
        ce, balance, z = loss_terms(params, args, tokens, dtype)
        return ce + s.aux_coef * balance + s.z_coef * z, ce, balance, z

    grad_fn = mx.value_and_grad(loss_fn)

    def step(params, opt_state, tokens, lr):
        (_, ce, balance, z), grads = grad_fn(params, tokens)
        grads, norm = clip_by_global_norm(grads, s.clip)
        params, opt_state = opt.update(params, grads, opt_state, lr)
        return params, opt_state, mx.stack([ce, balance, z, norm])

    compiled = mx.compile(step) if s.compile else step

    def checked_step(params, opt_state, tokens, lr):
        try:
            return compiled(params, opt_state, tokens, lr)
        except ValueError as err:  # raised while the first step is traced
            if "with respect to indices" in str(err):
                raise RuntimeError(ROUTE_FIX) from err
            raise

    return checked_step


def make_optimizer(s: Settings) -> AdamW:
    return AdamW(s.beta1, s.beta2, 1e-8, s.weight_decay, DTYPES[s.state_dtype])


class Log:
    """JSON lines in DIR/log.jsonl, echoed to stdout."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(text, flush=True)


class Budget:
    """Whether another step still leaves time for the held-out score and the save before the deadline."""

    def __init__(self, minutes: float, eval_batches: int, eval_seconds: float | None):
        self.deadline = START + 60 * minutes if minutes else math.inf
        self.eval_batches = eval_batches
        self.eval_seconds = eval_seconds  # the last chunk's
        self.step_times: list[float] = []

    def allows_step(self) -> bool:
        if len(self.step_times) < 2:  # the first step's time is mostly compilation
            return time.monotonic() + SAVE_RESERVE_S < self.deadline
        recent = self.step_times[1:][-20:] or self.step_times  # the first step includes compilation
        eval_s = (
            self.eval_seconds
            if self.eval_seconds is not None
            else (0.5 * sorted(recent)[len(recent) // 2] * self.eval_batches + 5)
        )  # a forward is ~1/3 of a step
        return time.monotonic() + 1.5 * max(recent) + eval_s + SAVE_RESERVE_S < self.deadline


def start(out: Path, resume: bool, settings: Settings, config: dict, data: dict):
    """(params, opt_state, state): fresh from the seed, or the checkpoint in `out`."""
    if resume:
        params, opt_state, state = checkpoint.load(out)
        if state["data"].get("train_sha256") != data.get("train_sha256"):
            raise ValueError(
                f"{out}: trained on train.bin {state['data'].get('train_sha256')}, "
                f"this data is {data.get('train_sha256')}; resume needs the same data"
            )
    elif checkpoint.exists(out):
        raise FileExistsError(
            f"{out}: holds a checkpoint; pass --resume to continue it or choose another --out"
        )
    else:
        params = init_params(config, settings.seed)
        opt_state = make_optimizer(settings).init(params)
        state = {
            "step": 0,
            "epoch": 0,
            "position": 0,
            "tokens": 0,
            "train_seconds": 0.0,
            "chunks": 0,
            "settings": dataclasses.asdict(settings),
            "data": data,
            "config": config,
        }
    # name order, so fresh and resumed runs trace identical graphs
    opt_state = {**opt_state, "m": _sorted(opt_state["m"]), "v": _sorted(opt_state["v"])}
    return _sorted(params), opt_state, state


def train(
    out: Path,
    *,
    data_dir: Path = DATA_DIR,
    tokenizer_dir: Path = ASSETS_DIR,
    resume: bool = False,
    settings: Settings | None = None,
    config: dict | None = None,
    minutes: float = 9.0,
    max_steps: int | None = None,
    log_every: int = 10,
    evaluate_at_end: bool = True,
) -> dict:
    """Run one chunk and save its checkpoint in `out`; returns state.json's contents."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = manifest(data_dir)
    data = {
        "train_sha256": m.get("train", {}).get("sha256"),
        "heldout_sha256": m.get("heldout", {}).get("sha256"),
    }
    params, opt_state, state = start(out, resume, settings or Settings(), config or CONFIG, data)
    s, config = Settings(**state["settings"]), state["config"]
    args = ModelArgs.from_config(config)
    check_params(params, args)
    windows = (
        eval_windows(load_tokens(data_dir, "heldout"), s.seq, s.eval_tokens) if evaluate_at_end else None
    )
    budget = Budget(minutes, 0 if windows is None else -(-len(windows) // s.batch), state.get("eval_seconds"))
    log = Log(out / "log.jsonl")
    chunk_start, steps_before = time.monotonic(), state["step"]
    params, opt_state = run_steps(
        params,
        opt_state,
        state,
        args,
        s,
        Batches(load_tokens(data_dir, "train"), s.batch, s.seq, s.seed),
        budget,
        log,
        max_steps,
        log_every,
    )
    if state["step"] >= s.total_steps:
        print(f"the schedule is complete ({s.total_steps} steps)", flush=True)
    state["train_seconds"] += time.monotonic() - chunk_start
    state["chunks"] += 1
    if windows is not None:
        t0 = time.monotonic()
        loss = evaluate(params, args, windows, s.batch, DTYPES[s.dtype])
        state["heldout_loss"], state["eval_seconds"] = loss, time.monotonic() - t0
        record = {
            "event": "eval",
            "step": state["step"],
            "tokens": state["tokens"],
            "heldout_loss": loss,
            "heldout_ppl": math.exp(loss),
            "eval_tokens": int(windows.shape[0] * s.seq),
            "eval_s": state["eval_seconds"],
        }
        log.write(
            record,
            f"held-out loss {loss:.4f}  perplexity {math.exp(loss):.2f}  "
            f"({record['eval_tokens']} tokens, {record['eval_s']:.1f}s)",
        )
    checkpoint.save(out, params, opt_state, state, config, tokenizer_dir)
    print(
        f"saved {out} at step {state['step']} ({state['step'] - steps_before} steps this chunk, "
        f"{time.monotonic() - START:.0f}s after start)",
        flush=True,
    )
    return state


def run_steps(
    params,
    opt_state,
    state: dict,
    args: ModelArgs,
    s: Settings,
    batches: Batches,
    budget: Budget,
    log: Log,
    max_steps: int | None,
    log_every: int,
):
    """Take steps until the schedule ends, `max_steps` are done or the budget says stop; updates `state`."""
    step_fn = make_step(args, s, make_optimizer(s))
    first, window = state["step"], []
    interval_start, interval_tokens = time.monotonic(), 0
    print(
        f"chunk {state['chunks'] + 1}: step {state['step']} of {s.total_steps}, epoch {state['epoch']} "
        f"({batches.per_epoch(state['epoch'])} steps/epoch), {time.monotonic() - START:.1f}s after start",
        flush=True,
    )
    while state["step"] < s.total_steps and (max_steps is None or state["step"] - first < max_steps):
        if not budget.allows_step():
            break
        t0 = time.monotonic()
        lr = learning_rate(state["step"], s.lr, s.warmup, s.total_steps, s.final_lr_ratio)
        tokens = mx.array(batches.get(state["epoch"], state["position"]))
        params, opt_state, metrics = step_fn(params, opt_state, tokens, mx.array(lr, mx.float32))
        mx.eval(params, opt_state, metrics)
        budget.step_times.append(time.monotonic() - t0)
        state["step"] += 1
        state["tokens"] += s.batch * s.seq
        interval_tokens += s.batch * s.seq
        state["epoch"], state["position"] = batches.advance(state["epoch"], state["position"])
        window.append(metrics)
        if state["step"] % log_every == 0 or state["step"] == s.total_steps:
            now = time.monotonic()
            ce, balance, z, norm = mx.stack(window).mean(axis=0).tolist()  # a sync, once per log line
            record = {
                "step": state["step"],
                "epoch": state["epoch"],
                "tokens": state["tokens"],
                "loss": ce,
                "balance": balance,
                "z": z,
                "grad_norm": norm,
                "lr": lr,
                "tokens_per_s": interval_tokens / (now - interval_start),
                "elapsed_s": now - START,
            }
            log.write(
                record,
                f"step {state['step']:6d}  loss {ce:.4f}  bal {balance:.3f}  z {z:.2f}  "
                f"gnorm {norm:.2f}  lr {lr:.2e}  {record['tokens_per_s']:,.0f} tok/s  "
                f"{record['elapsed_s']:.0f}s",
            )
            window, interval_start, interval_tokens = [], now, 0
    return params, opt_state


def _sorted(tensors: dict) -> dict:
    """The same dict in name order."""
    return {k: tensors[k] for k in sorted(tensors)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder (created)")
    parser.add_argument(
        "--data",
        type=Path,
        default=DATA_DIR,
        help="folder with train.bin, heldout.bin, manifest.json",
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=ASSETS_DIR, help="folder with tokenizer.json (copied in)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="model config.json for a fresh run (default: training/model_config.py's CONFIG)",
    )
    parser.add_argument(
        "--minutes", type=float, default=9.0, help="wall-clock budget of this chunk (0: none)"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="stop this chunk after this many steps")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--no-eval", action="store_true", help="skip the held-out score at the end of the chunk"
    )
    for f in dataclasses.fields(Settings):  # settings: only for a fresh run (a resumed one keeps its own)
        if f.type == "bool":
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=_boolean, default=None, metavar="{0,1}")
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            choices = list(DTYPES) if f.name.endswith("dtype") else None
            parser.add_argument(
                f"--{f.name.replace('_', '-')}",
                type=kind,
                default=None,
                choices=choices,
                help=f"default {f.default}",
            )
    return parser.parse_args(argv)


def _boolean(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "on")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    given = {
        f.name: getattr(a, f.name) for f in dataclasses.fields(Settings) if getattr(a, f.name) is not None
    }
    if a.resume and given:
        saved = checkpoint.read_state(a.out).get("settings", {})
        changed = {k: v for k, v in given.items() if saved.get(k) != v}
        if changed:
            raise SystemExit(
                f"{a.out}: a resumed run keeps its settings; these differ from the saved ones: {changed}"
            )
    if a.resume and a.config:
        raise SystemExit(f"{a.out}: a resumed run keeps its model config; drop --config")
    config = json.loads(a.config.read_text()) if a.config else None
    train(
        a.out,
        data_dir=a.data,
        tokenizer_dir=a.tokenizer,
        resume=a.resume,
        settings=Settings(**given),
        config=config,
        minutes=a.minutes,
        max_steps=a.max_steps,
        log_every=a.log_every,
        evaluate_at_end=not a.no_eval,
    )


if __name__ == "__main__":
    main()
