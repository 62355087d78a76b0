"""docs/benchmarks.md, "Exact resume from shards with damaged records": an uninterrupted
run (U), one SIGKILLed at step 17 and restarted (K), and 2 processes to step 20 then 1
process (T), all from shards with 4 damaged records.

    python docs/figures/resume_from_shards.py [OUT_DIR [U K T]]
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from mmjax.data.convert import convert  # noqa: E402
from mmjax.data.records import ArrayRecordShards  # noqa: E402
from tiny import DEMO, tiny_overrides  # noqa: E402

D = sys.argv[1] if len(sys.argv) > 1 else "/tmp/resume_from_shards"


def build():
    rng = np.random.default_rng(0)
    os.makedirs(f"{D}/img", exist_ok=True)
    rows = []
    for i in range(256):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(f"{D}/img/{i}.png")
        rows.append(f"img/{i}.png,a {['red', 'green', 'blue', 'white'][i % 4]} thing number {i % 7}\n")
    open(f"{D}/list.csv", "w").write("image_path,caption\n" + "".join(rows))
    convert(f"{D}/list.csv", f"{D}/shards", workers=1, records_per_shard=64)
    r = ArrayRecordShards(f"{D}/shards")
    for victim in (5, 70, 71, 200):  # damaged records in three shards
        raw = r.read([victim])[0]["image"]
        f = os.path.join(f"{D}/shards", r.shards[victim // 64]["path"])
        data = bytearray(open(f, "rb").read())
        at = data.find(raw) + len(raw) // 2
        data[at : at + 32] = bytes(32)
        open(f, "wb").write(bytes(data))
    assert [x is None for x in ArrayRecordShards(f"{D}/shards").read([5, 70, 71, 200])] == [True] * 4


FLAGS = {
    "data.name": "shards",
    "data.path": f"{D}/shards",
    "train.steps": 40,
    "train.ckpt_every": 10,
    "train.log_every": 1,
    "eval.at_end": False,
    "parallel.mesh": "{'data': 8, 'fsdp': 1, 'tensor': 1}",
}
ENV = dict(
    os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"
)


def cmd(workdir, extra=()):
    flags = [f"--config.{k}={v}" for k, v in tiny_overrides(f"{D}/tfds", **FLAGS).items()]
    return [
        sys.executable,
        "-m",
        "mmjax.cli",
        "train",
        "--config",
        DEMO,
        "--workdir",
        workdir,
        "--no-progress",
        *extra,
        *flags,
    ]


def run(workdir, extra=(), procs=1, env=ENV):
    if procs == 1:
        return subprocess.run(cmd(workdir, extra), env=env, capture_output=True, text=True).returncode
    s = socket.socket()
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
    s.close()
    env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    ps = [
        subprocess.Popen(
            cmd(
                workdir,
                [*extra, "--coordinator", f"localhost:{port}", "--num-processes", str(procs), "--process-id", str(i)],
            ),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(procs)
    ]
    return [p.wait() for p in ps]


def kill_at(workdir, step):
    """Starts a 1-process run and SIGKILLs it once metrics.jsonl shows `step`."""
    p = subprocess.Popen(cmd(workdir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    m = f"{workdir}/metrics.jsonl"
    while p.poll() is None:
        if os.path.exists(m) and any(json.loads(l).get("step", 0) >= step for l in open(m) if l.strip()):
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    return p.wait()


def train_rows(workdir):
    rows = {}
    for l in open(f"{workdir}/metrics.jsonl"):
        r = json.loads(l)
        if r["kind"] == "train":
            rows[r["step"]] = r  # a re-done step after a kill: the last write wins
    return rows


def params(workdir):
    import jax

    from mmjax import workdir as wd

    o = wd.open_workdir(workdir)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(o.params)[0]}


if __name__ == "__main__":
    if not os.path.isdir(f"{D}/shards"):
        build()
    todo = sys.argv[2:] or ["U", "K", "T"]
    for w in todo:
        os.system(f"rm -rf {D}/{w}")
    if "U" in todo:
        t = time.time()
        print("uninterrupted", run(f"{D}/U"), round(time.time() - t), flush=True)
    if "K" in todo:
        print("killed at 17:", kill_at(f"{D}/K", 17), "resumed:", run(f"{D}/K"), flush=True)
    if "T" in todo:
        two = run(f"{D}/T", ["--stop-at", "20"], procs=2)
        assert two == [0, 0] and os.path.isdir(f"{D}/T/checkpoints/20"), two
        print("2 processes to 20:", two, "then 1 process:", run(f"{D}/T"), flush=True)
    U, pu = train_rows(f"{D}/U"), params(f"{D}/U")
    for w in ("K", "T"):
        R, pr = train_rows(f"{D}/{w}"), params(f"{D}/{w}")
        same_loss = all(R[s]["loss"] == U[s]["loss"] for s in U)
        d = max(float(np.abs(pu[k] - pr[k]).max()) for k in pu)
        print(
            w,
            "steps",
            len(R),
            "losses equal at every step:",
            same_loss,
            "max |dparams|:",
            d,
            "skipped_records at 40:",
            U[40].get("skipped_records"),
            R[40].get("skipped_records"),
        )
