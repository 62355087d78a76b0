"""Metrics to JSONL and TensorBoard, and the end-of-run plot (process 0 only)."""
from __future__ import annotations

import json
import os

import jax


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, kind: str, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "kind": kind, **{k: _py(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k not in ("step", "kind") and isinstance(v, (int, float)):
                # TensorBoard tags allow no '@': i2t_r@1 -> i2t_r_at_1
                self._tb.add_scalar(f"{kind}/{k.replace('@', '_at_')}", v, int(step))
        self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _py(v):
    try:
        return float(v) if not isinstance(v, (int, str)) else v
    except (TypeError, ValueError):
        return str(v)


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(workdir: str, out_name: str = "curves.png") -> str | None:
    """Loss (train) and recall (eval) against step, as a PNG in the workdir."""
    if jax.process_index() != 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title("training loss")
    for key in ("i2t_r@1", "t2i_r@1", "i2t_r@5", "binding_acc", "zero_shot_top1"):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=key)
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out metric")
    ax2.set_ylim(0, 1)
    ax2.set_title("evaluation")
    if ax2.lines:
        ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = os.path.join(workdir, out_name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
