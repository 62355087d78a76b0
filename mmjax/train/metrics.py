"""Metrics to JSONL and TensorBoard, and the end-of-run plot (process 0 only)."""

from __future__ import annotations

import json
import logging
import math
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
            if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
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


def _parse(lines):
    """(rows, numbers of the lines that are not a JSON object): a kill in the middle
    of an append leaves a torn last line, which readers skip."""
    rows, bad = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        else:
            bad.append(i)
    return rows, bad


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows, bad = _parse(f)
    if bad:
        logging.getLogger(__name__).warning("%s: skipped unreadable line(s) %s (a run killed mid-write)", path, bad)
    return rows


def truncate(workdir: str, step: int) -> int:
    """Keeps the rows of metrics.jsonl with step <= `step` (a resumed run re-does the
    steps after its checkpoint and writes them again) and drops torn lines; returns
    how many rows were dropped. Process 0 only; atomic (write + rename)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    rows, bad = _parse(lines)
    keep = [r for r in rows if int(r["step"]) <= int(step)]
    dropped = len(rows) - len(keep) + len(bad)
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(path + ".tmp", path)
        logging.getLogger(__name__).info(
            "metrics.jsonl: dropped %d rows after step %d (re-done on resume) or torn", dropped, step
        )
    return dropped


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
