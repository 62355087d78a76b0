"""`mmjax bench`: times the real train step on synthetic batches, without TensorFlow."""

import json
import os
import subprocess
import sys

from tiny import ROOT

CODE = """
import sys
sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
sys.modules["tensorflow_datasets"] = None
import json
import jax
from mmjax import bench, config
over = ["data.image_size=16", "data.text_len=12", "data.tokenizer.vocab_size=40", "model.image=mu/4",
        "model.image_overrides={}", "model.text_overrides={}", "model.embed_dim=16", "train.batch_size=8"]
# (CLIP's row is tests/test_speed_switches.py's; ALBEF's adds the EMA + queue timing)
rows = [bench.step_time(config.load(ROOT + "/configs/albef.py", over + ["model.queue_size=20"]), steps=2, warmup=1)]
cfg = lambda m: config.load(ROOT + "/configs/albef.py", over + ["model.queue_size=64", "parallel.mesh=" + m])
plan = bench.memory_plan(cfg("{'fsdp': 8}"))  # compiled; the replicated sizes need no compile:
abstract = bench._prepare(cfg("{'data': 8}"))[5]
nbytes = lambda t: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))) if t is not None else 0
full = {k + "_bytes": nbytes(getattr(abstract, n)) for k, n in
        (("param", "params"), ("opt", "opt_state"), ("ema", "ema_params"), ("queue", "queues"))}
print(bench.format_plan(plan))
print(json.dumps([rows, [full, plan]]))
"""


def test_bench_runs_the_step_without_tensorflow():
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
    r = subprocess.run(
        [sys.executable, "-c", f"ROOT = {ROOT!r}\n" + CODE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (albef,), (full, fsdp) = json.loads(r.stdout.strip().splitlines()[-1])
    assert albef["ms_per_step"] > 0 and albef["batch_size"] == 8 and albef["devices"] == 8
    assert albef["loss"] == albef["loss"]  # finite, not NaN
    assert albef["family"] == "albef" and albef["params"] > 0
    # The EMA teacher and queue write, timed alone, for the family that has them.
    assert albef["ema_queue_ms"] > 0
    assert albef["ema_queue_fraction"] == albef["ema_queue_ms"] / albef["ms_per_step"]
    # analytic FLOPs and MFU against the measured ceiling
    assert (
        albef["gflops_per_sample"] > 0 and 0 < albef["mfu"] == albef["model_tflops_per_device"] / albef["matmul_tflops"]
    )

    # The dry-run memory plan (also without TensorFlow): FSDP over 8 devices keeps
    # about 1/8 of the whole (replicated) state per device, in the state's shardings
    # and in XLA's compiled argument sizes.
    assert "optimizer state" in r.stdout and "XLA temp" in r.stdout
    assert fsdp["mesh"]["fsdp"] == 8 and fsdp["devices"] == 8
    for key in ("param_bytes", "opt_bytes", "ema_bytes", "queue_bytes"):
        assert full[key] > 0 and 1 / 8 <= fsdp[key] / full[key] < 0.2, key
    assert fsdp["xla_argument_bytes"] / sum(full.values()) < 0.3
    assert fsdp["state_bytes"] == fsdp["param_bytes"] + fsdp["opt_bytes"] + fsdp["ema_bytes"] + fsdp["queue_bytes"]
