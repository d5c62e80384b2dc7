"""What a checkpoint learned: `python -m training.report DIR [--data training/data]`.

Held-out perplexity, and per MoE layer over the same held-out tokens: each expert's share
of the routed (token, slot) pairs, how evenly that load spreads (entropy of the shares over
log E: 1.0 is perfectly even), and how decided the router is per token (mean entropy of
its softmax, in nats; log E is undecided). Printed as a table, saved as DIR/report.json;
with matplotlib installed, DIR/loss.png plots DIR/log.jsonl. Works on any checkpoint
flashmoe loads, quantized exports included.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from flashmoe.analysis.evaluate import token_nll
from flashmoe.loader import load_model

from .checkpoint import read_state
from .corpus import DATA_DIR
from .data import eval_windows, load_tokens


def routing_stats(logits: mx.array, experts: mx.array, num_experts: int) -> tuple[np.ndarray, float]:
    """(routed slots per expert (E,), summed router entropy in nats) of one batch's routing."""
    chosen = (experts.reshape(-1)[:, None] == mx.arange(num_experts)).astype(mx.float32)  # (N K, E)
    logits = logits.astype(mx.float32).reshape(-1, num_experts)  # (N, E)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    entropy = -(mx.exp(logp) * logp).sum()
    return np.array(chosen.sum(axis=0)), entropy.item()


def analyse(directory: Path, data_dir: Path, seq: int, max_tokens: int, batch: int = 16) -> dict:
    """Held-out loss and per-layer routing statistics of the checkpoint in `directory`."""
    model = load_model(directory)
    E = model.args.num_experts
    windows = eval_windows(load_tokens(data_dir, "heldout"), seq, max_tokens)
    nll_sum, count = 0.0, 0
    loads = {i: np.zeros(E) for i in model.moe_layers}
    entropies = dict.fromkeys(model.moe_layers, 0.0)
    for i in range(0, len(windows), batch):
        tokens = mx.array(windows[i : i + batch])
        nll = token_nll(model(tokens[:, :-1]), tokens[:, 1:])
        nll_sum, count = nll_sum + nll.sum().item(), count + nll.size
        for layer, r in model.routing().items():
            slots, entropy = routing_stats(r.logits, r.experts, E)
            loads[layer] += slots
            entropies[layer] += entropy
    layers = []
    for layer in model.moe_layers:
        share = loads[layer] / loads[layer].sum()
        nonzero = share[share > 0]
        layers.append(
            {
                "layer": layer,
                "mixer": "linear attention" if model.layers[layer].is_linear else "attention",
                "load": share.round(5).tolist(),
                "load_entropy": float(-(nonzero * np.log(nonzero)).sum() / math.log(E)),
                "max_share_x_E": float(share.max() * E),
                "min_share_x_E": float(share.min() * E),
                "unused_experts": int((loads[layer] == 0).sum()),
                "router_entropy": entropies[layer] / count,
            }
        )
    loss = nll_sum / count
    return {
        "checkpoint": str(directory),
        "heldout_loss": loss,
        "heldout_ppl": math.exp(loss),
        "tokens": count,
        "seq": seq,
        "num_experts": E,
        "max_router_entropy": math.log(E),
        "layers": layers,
    }


def table(report: dict) -> str:
    """The report as text: one line per MoE layer."""
    lines = [
        (
            f"{report['checkpoint']}: held-out loss {report['heldout_loss']:.4f} nats/token, "
            f"perplexity {report['heldout_ppl']:.2f} over {report['tokens']} tokens"
        ),
        (
            f"{'layer':>5}  {'mixer':16}  {'load evenness':>13}  {'busiest xE':>10}  {'idlest xE':>9}  "
            f"{'unused':>6}  {'router entropy':>14}  (max {report['max_router_entropy']:.2f})"
        ),
    ]
    for r in report["layers"]:
        lines.append(
            f"{r['layer']:5d}  {r['mixer']:16}  {r['load_entropy']:13.3f}  {r['max_share_x_E']:10.2f}  "
            f"{r['min_share_x_E']:9.2f}  {r['unused_experts']:6d}  {r['router_entropy']:14.3f}"
        )
    return "\n".join(lines)


def plot_log(log_path: Path, png: Path) -> bool:
    """Training loss (and held-out points) against tokens seen; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        [r["tokens"] / 1e6 for r in train],
        [r["loss"] for r in train],
        lw=1,
        label="train (cross-entropy)",
    )
    ax.plot(
        [r["tokens"] / 1e6 for r in evals],
        [r["heldout_loss"] for r in evals],
        "o",
        label="held-out",
    )
    ax.set(xlabel="tokens seen (millions)", ylabel="nats per token", title=log_path.parent.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--seq", type=int, default=None, help="window length (default: the training run's)")
    parser.add_argument("--tokens", type=int, default=65536, help="held-out tokens to score (from the start)")
    parser.add_argument("--json", type=Path, default=None, help="default: CHECKPOINT/report.json")
    a = parser.parse_args(argv)
    seq = a.seq or read_state(a.checkpoint).get("settings", {}).get("seq", 256)
    report = analyse(a.checkpoint, a.data, seq, a.tokens)
    print(table(report))
    out = a.json or a.checkpoint / "report.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    log = a.checkpoint / "log.jsonl"
    if log.is_file():
        png = a.checkpoint / "loss.png"
        print(f"wrote {png}" if plot_log(log, png) else "matplotlib is not installed: no loss plot")


if __name__ == "__main__":
    main()
