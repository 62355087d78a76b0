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
from mmjax import bench, config
over = ["data.image_size=16", "data.text_len=12", "data.tokenizer.vocab_size=40", "model.image=mu/4",
        "model.image_overrides={}", "model.text_overrides={}", "model.embed_dim=16", "train.batch_size=8"]
# (CLIP's row is tests/test_speed_switches.py's; ALBEF's adds the EMA + queue timing)
rows = [bench.step_time(config.load(ROOT + "/configs/albef.py", over + ["model.queue_size=20"]), steps=2, warmup=1)]
plans = [bench.memory_plan(config.load(ROOT + "/configs/albef.py", over + ["model.queue_size=64", "parallel.mesh=" + m]))
         for m in ("{'data': 8}", "{'fsdp': 8}")]
print(bench.format_plan(plans[1]))
print(json.dumps([rows, plans]))
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
    (albef,), (rep, fsdp) = json.loads(r.stdout.strip().splitlines()[-1])
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
    # about 1/8 of the replicated state per device, in the state's shardings and in
    # XLA's compiled argument sizes.
    assert "optimizer state" in r.stdout and "XLA temp" in r.stdout
    assert rep["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and fsdp["mesh"]["fsdp"] == 8
    for key in ("param_bytes", "opt_bytes", "ema_bytes", "queue_bytes"):
        assert 1 / 8 <= fsdp[key] / rep[key] < 0.2, key
    assert fsdp["xla_argument_bytes"] / rep["xla_argument_bytes"] < 0.3
    assert rep["state_bytes"] == rep["param_bytes"] + rep["opt_bytes"] + rep["ema_bytes"] + rep["queue_bytes"]
