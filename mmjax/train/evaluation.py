"""A training run's evaluations: the evaluator (checked before the first step) and
one eval at a step, written to the metrics and shown on the progress bar."""

from __future__ import annotations

import time

from tqdm import tqdm

# The metrics an eval line shows (all of them go to metrics.jsonl).
SHOWN = (
    "i2t_r@1",
    "i2t_itm_r@1",
    "i2t_r@5",
    "t2i_r@1",
    "t2i_itm_r@1",
    "binding_acc",
    "time_probe_acc",
    "zero_shot_top1",
    "i2t_chance@1",
    "top1",
    "top5",
    "caption_exact",
    "caption_cider",
    "perplexity",
    "answer_acc",
)


def format_metrics(metrics: dict, keys) -> str:
    return " ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics)


def make_evaluator(setup, config):
    """The run's evaluator, or None when neither eval.every nor eval.at_end asks for
    one. A missing or empty eval split fails now, not after hours (ValueError)."""
    if not (config.eval.every or config.eval.at_end):
        return None
    from mmjax.data import sources

    evaluator = setup.evaluator()
    source, split = sources.eval_source(config.data)  # data.eval_path's set, when given
    if source.num_examples(split) == 0:
        raise ValueError(
            f"eval split {config.data.eval_split!r} of {config.data.name!r} is empty ({source.describe(split)}); "
            "set data.eval_path, data.eval_fraction (file lists) or eval.every=0 eval.at_end=false"
        )
    return evaluator


def run_eval(evaluator, setup, state, writer, step: int) -> dict:
    """Evaluates `state`'s params (the student) at `step`; -> the metrics."""
    t0 = time.time()
    metrics = evaluator(setup.to_checkpoint_layout(state).params)
    metrics["eval_seconds"] = time.time() - t0
    writer.write(step, "eval", metrics)
    tqdm.write(f"[eval step {step}] " + format_metrics(metrics, SHOWN))
    return metrics
