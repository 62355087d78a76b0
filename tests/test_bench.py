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
rows = [bench.step_time(config.load(ROOT + "/configs/" + name, over + extra), steps=2, warmup=1)
        for name, extra in (("demo.py", []), ("albef.py", ["model.queue_size=20"]))]
print(json.dumps(rows))
"""


def test_bench_runs_the_step_without_tensorflow():
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
    r = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + CODE], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    clip, albef = json.loads(r.stdout.strip().splitlines()[-1])
    for row in (clip, albef):
        assert row["ms_per_step"] > 0 and row["batch_size"] == 8 and row["devices"] == 8
        assert row["loss"] == row["loss"]  # finite, not NaN
    assert (clip["family"], albef["family"]) == ("clip", "albef")
    assert albef["params"] > clip["params"]  # fusion layers and heads on top of the towers
