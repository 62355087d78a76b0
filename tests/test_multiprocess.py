"""Several processes on localhost, each with 4 CPU devices, joined by JAX's own
runtime (`mmjax.parallel.distributed.initialize`, gloo collectives): the code path of
a pod. A run started on 2 processes x 4 devices resumes on 1 process x 8 devices with
another mesh and ends where an uninterrupted run ends; a dead peer ends the job."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmjax.train import loop
from mmjax.train import setup as setup_lib
from tiny import DEMO, ROOT, tiny_config, tiny_overrides

CHILD_FLAGS = (
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)


def _port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, data_dir, n, extra_args=(), **overrides):
    """`n` processes of `mmjax train` on localhost; returns the Popen objects."""
    port = _port()
    env = dict(os.environ, XLA_FLAGS=CHILD_FLAGS, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    flags = [f"--config.{k}={v}" for k, v in tiny_overrides(data_dir, **overrides).items()]
    procs = []
    for i in range(n):
        cmd = [
            sys.executable,
            "-m",
            "mmjax.cli",
            "train",
            "--config",
            DEMO,
            "--workdir",
            str(workdir),
            "--no-progress",
            "--coordinator",
            f"localhost:{port}",
            "--num-processes",
            str(n),
            "--process-id",
            str(i),
            *extra_args,
            *flags,
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _wait(procs, timeout):
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    return [p.returncode for p in procs], outs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mp_tfds")


def test_two_processes_then_one_process_other_mesh(tmp_path, data_dir, shards_dir):
    """Training from shards with a damaged record (the index pipeline: each process reads
    only its rows' records), evaluating on a separate list (`data.eval_path`): 2 processes
    x 4 devices (mesh data=4 x fsdp=2 over all 8) train 10 of 20 steps; 1 process x 8
    devices on a (data=2, fsdp=2, tensor=2) mesh resumes from that checkpoint; the params
    equal a 20-step run on 1 process x 8 devices (data=8), both count the replaced
    record, and each of the 2 processes read about half the record bytes of 1."""
    common = {
        "train.steps": 20,
        "train.ckpt_every": 10,
        "eval.at_end": False,
        "data.name": "shards",
        "data.path": shards_dir,
        "data.eval_path": os.path.join(os.path.dirname(shards_dir), "list.csv"),
    }
    procs = _launch(
        tmp_path / "a",
        data_dir,
        2,
        ["--stop-at", "10"],
        **common,
        **{"parallel.mesh": "{'data': 4, 'fsdp': 2, 'tensor': 1}", "eval.every": 10},
    )
    codes, outs = _wait(procs, timeout=600)
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert os.path.isdir(tmp_path / "a" / "checkpoints" / "10")
    # The 2-process evaluation at step 10 equals a 1-process evaluation of that checkpoint.
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    two = next(r for r in rows if r["kind"] == "eval" and r["step"] == 10)
    setup = setup_lib.Setup(tiny_config(data_dir, **common), str(tmp_path / "a"))
    state, _ = setup.restore(step=10)
    one = setup.evaluator()(state.params)
    setup.checkpointer.close()
    assert two["num_images"] == 64
    for k in ("i2t_r@1", "i2t_r@5", "t2i_r@1"):
        assert abs(two[k] - one[k]) < 1e-6, (k, two[k], one[k])
    resumed = loop.train(
        tiny_config(data_dir, **common, **{"parallel.mesh": "{'data': 2, 'fsdp': 2, 'tensor': 2}"}),
        str(tmp_path / "a"),
        progress=False,
    )
    straight = loop.train(
        tiny_config(data_dir, **common, **{"parallel.mesh": "{'data': 8, 'fsdp': 1, 'tensor': 1}"}),
        str(tmp_path / "b"),
        progress=False,
    )
    assert int(resumed["final_state"].step) == 20
    for a, b in zip(jax.tree.leaves(resumed["final_state"].params), jax.tree.leaves(straight["final_state"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)

    # Each process read about half the record bytes one process reads for the same 10
    # global batches (its own rows; both runs read a few batches ahead the same way).
    def meta(w):
        with open(tmp_path / w / "checkpoints" / "10" / "meta" / "metadata") as f:
            return json.load(f)

    (one_bytes,), two_bytes = meta("b")["record_bytes"], meta("a")["record_bytes"]
    assert len(two_bytes) == 2 and all(0.3 < b / one_bytes < 0.7 for b in two_bytes), (two_bytes, one_bytes)
    # 20 steps x 16 rows = 5 epochs of 64 records: the damaged one is replaced once an epoch
    for w in ("a", "b"):
        rows = [json.loads(line) for line in open(tmp_path / w / "metrics.jsonl")]
        assert [r["skipped_records"] for r in rows if r["kind"] == "train"][-1] == 5, w


def test_dead_peer_ends_the_job(tmp_path, data_dir):
    """SIGKILL process 1 mid-training: process 0 exits non-zero within the heartbeat
    timeout (plus start-up slack) instead of waiting forever in a collective."""
    heartbeat = 5
    procs = _launch(
        tmp_path / "w",
        data_dir,
        2,
        (),
        **{
            "train.steps": 100000,
            "train.log_every": 1,
            "train.ckpt_every": 0,
            "eval.at_end": False,
            "parallel.heartbeat_timeout_s": heartbeat,
            "parallel.init_timeout_s": 120,
        },
    )
    metrics = tmp_path / "w" / "metrics.jsonl"
    t0 = time.time()
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert time.time() - t0 < 300 and procs[0].poll() is None, "training did not start"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        out, _ = procs[0].communicate(timeout=heartbeat + 60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0
    assert time.time() - killed < heartbeat + 60
    # How the survivor learns of it depends on where the peer died: JAX's heartbeat,
    # a closed socket, or gloo reading the dead peer's half-sent message.
    signs = ("heartbeat", "unhealthy", "Socket closed", "gloo::EnforceNotMet")
    assert any(s in out for s in signs), out[-2000:]


def test_watchdog_exits_when_steps_stop():
    """A peer that is alive but stuck keeps heartbeats going; the step watchdog is
    what ends the process then (here with a fake exit to observe it)."""
    from mmjax.parallel import distributed

    codes = []
    wd = distributed.StepWatchdog(0.4, exit=codes.append)
    for _ in range(4):  # steps finishing in time: no exit
        time.sleep(0.1)
        wd.beat()
    assert codes == []
    time.sleep(1.2)  # no step finishes
    assert codes == [distributed.WATCHDOG_EXIT]
    wd.close()
    assert distributed.StepWatchdog(0).beat() is None  # disabled: no thread


def test_initialize_needs_all_three_flags(monkeypatch):
    from mmjax.parallel import distributed

    for k in ("MMJAX_COORDINATOR", "MMJAX_NUM_PROCESSES", "MMJAX_PROCESS_ID", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.initialize() is False  # one process: nothing to join
    with pytest.raises(ValueError, match="--process-id"):
        distributed.initialize("localhost:1234", 2, None)
    with pytest.raises(ValueError, match="must lie in"):
        distributed.initialize("localhost:1234", 2, 5)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    """64 captioned 16px images converted to 4 ArrayRecord shards, one record damaged."""
    from PIL import Image

    from mmjax.data.convert import convert
    from mmjax.data.records import ArrayRecordShards

    d = tmp_path_factory.mktemp("mp_shards")
    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue", "white"]
    rows = []
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
        rows.append(f"{i}.png,a {colors[i % 4]} thing number {i % 7}\n")
    (d / "list.csv").write_text("image_path,caption\n" + "".join(rows))
    out = str(d / "shards")
    convert(str(d / "list.csv"), out, workers=1, records_per_shard=16)
    victim = 37
    reader = ArrayRecordShards(out)
    raw = reader.read([victim])[0]["image"]
    f = os.path.join(out, reader.shards[victim // 16]["path"])
    data = bytearray(open(f, "rb").read())
    at = data.find(raw) + len(raw) // 2  # shards are stored uncompressed: the image bytes are there
    data[at : at + 32] = bytes(32)
    open(f, "wb").write(bytes(data))
    assert ArrayRecordShards(out).read([victim]) == [None]
    return out
