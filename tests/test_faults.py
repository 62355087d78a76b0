"""Fault injection (docs/reliability.md): kill -9 in a step, in an async save and just
before a save is sealed, SIGTERM on one and on two processes, NaN batches, damaged and
partial checkpoints, a torn metrics log, an unwritable workdir and a changed model
shape. A tiny ALBEF (EMA teacher + feature queues, 8 steps, a checkpoint every 4) is the
run every fault is compared with, bit for bit.

Run as a script (`python tests/test_faults.py FAULT mmjax-cli-args...`) this file is the
child process: it arms FAULT, then runs `mmjax.cli.main`.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tiny import ALBEF, ROOT, albef_config, albef_overrides

STEPS = 8

# The test_faults runs: 8 steps, a checkpoint every 4, every step logged.
FAULT_RUN = {
    "train.steps": STEPS,
    "train.log_every": 1,
    "train.ckpt_every": 4,
    "train.keep_checkpoints": 2,
    "eval.at_end": False,
}


def _albef_overrides(data_dir, **extra) -> dict:
    return albef_overrides(data_dir, **{**FAULT_RUN, **extra})


def _albef_config(data_dir, **extra):
    return albef_config(data_dir, **{**FAULT_RUN, **extra})


def _leaves(state) -> dict:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def _assert_bit_equal(a, b):
    a, b = _leaves(a), _leaves(b)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert any(".ema_params" in k for k in a) and any(".queues" in k for k in a) and any(".opt_state" in k for k in a)


def _train_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"train"' in line]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults_tfds")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted run every fault run must end equal to: (workdir, final state)."""
    from mmjax.train import loop

    workdir = str(tmp_path_factory.mktemp("reference") / "w")
    result = loop.train(_albef_config(data_dir), workdir, progress=False)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    return workdir, jax_host(result["final_state"])


def jax_host(tree):
    import jax

    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _copy(reference, tmp_path):
    dst = str(tmp_path / "w")
    shutil.copytree(reference[0], dst)
    return dst


# ----------------------------------------------------------------------------- children


def _child(fault: str, argv: list) -> int:
    """Arms `fault` (KIND:N) in this process, then runs the CLI."""
    from mmjax import checkpoint as ckpt_lib
    from mmjax import cli
    from mmjax.train import step as step_lib

    kind, _, n = fault.partition(":")
    n = int(n or 0)
    die = lambda sig=signal.SIGKILL: os.kill(os.getpid(), sig)
    if kind == "kill_in_step":  # the n-th step of this process, just dispatched, a save in flight
        from orbax.checkpoint._src.checkpointers import async_checkpointer as ac

        commit = ac._background_wait_for_commit_futures

        def slow_commit(*args, **kw):  # the async save is still writing when the kill comes
            time.sleep(10)
            return commit(*args, **kw)

        ac._background_wait_for_commit_futures = slow_commit
        compile_step = step_lib.compile_step

        def counted(*args, **kw):
            fn, calls = compile_step(*args, **kw), [0]

            def run(state, batch):
                out = fn(state, batch)
                calls[0] += 1
                if calls[0] == n:
                    die()
                return out

            return run

        step_lib.compile_step = counted
    elif kind == "kill_before_rename":  # every file of step n written, not yet sealed nor renamed
        write = ckpt_lib.write_manifest

        def writing(step_dir, step, shapes):
            if step == n:
                die()
            write(step_dir, step, shapes)

        ckpt_lib.write_manifest = writing
    return cli.main(argv)


def _run_child(fault, workdir, data_dir, timeout=900):
    flags = [f"--config.{k}={v}" for k, v in _albef_overrides(data_dir).items()]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    # The children compile the step the reference run compiled: share its cache.
    import jax

    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        fault,
        "train",
        "--config",
        ALBEF,
        "--workdir",
        workdir,
        "--no-progress",
        *flags,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_kill9_and_sigterm_then_resume_is_bit_exact(reference, data_dir, tmp_path, monkeypatch):
    """One workdir through three faults, then a resume: kill -9 while step 5 computes and
    step 4's async save is being written; kill -9 with the final step 8 written but not
    sealed (no manifest, not renamed); SIGTERM while step 6 computes (the step finishes,
    a checkpoint is saved, exit code 143). The final params, EMA teacher,
    queues, optimizer state, rng and step equal the uninterrupted run's bit for bit,
    and metrics.jsonl has every step once with the uninterrupted run's losses. (The
    kills run in child processes, the SIGTERM in this one.)"""
    from mmjax import checkpoint as ckpt_lib
    from mmjax import checkpoint_manifest as manifest_lib
    from mmjax.train import guard, loop

    workdir = str(tmp_path / "w")
    ckpts = os.path.join(workdir, "checkpoints")
    os.makedirs(workdir)  # the reference's tokenizer (the same captions train the same one)
    shutil.copyfile(os.path.join(reference[0], "tokenizer.model"), os.path.join(workdir, "tokenizer.model"))
    code, out = _run_child("kill_in_step:5", workdir, data_dir)
    assert code == -signal.SIGKILL, out[-3000:]
    assert os.listdir(ckpts) == [f"4{ckpt_lib.TMP_SUFFIX}"]  # step 4 never finished
    code, out = _run_child("kill_before_rename:8", workdir, data_dir)  # from scratch again
    assert code == -signal.SIGKILL, out[-3000:]
    assert sorted(os.listdir(ckpts)) == ["4", f"8{ckpt_lib.TMP_SUFFIX}"]
    # SIGTERM while step 6 computes (in this process: the exit code is the multi-process test's).
    from mmjax.train import step as step_lib

    compile_step, calls = step_lib.compile_step, []

    def signalled(*args, **kw):
        fn = compile_step(*args, **kw)

        def run(state, batch):
            out = fn(state, batch)
            calls.append(1)
            if len(calls) == 2:  # resumed at 4: the step that ends at 6
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        return run

    monkeypatch.setattr(step_lib, "compile_step", signalled)
    before = signal.signal(signal.SIGTERM, lambda *_: None)  # a loop that ignores SIGTERM fails, not pytest
    try:
        with pytest.raises(guard.Preempted) as stop:
            loop.train(_albef_config(data_dir), workdir, progress=False)
    finally:
        signal.signal(signal.SIGTERM, before)
    monkeypatch.undo()
    assert stop.value.code == guard.PREEMPTED_EXIT == 143 and stop.value.step == 6
    assert sorted(os.listdir(ckpts)) == ["4", "6"]  # the partial 8 was removed; keep-2
    assert manifest_lib.verify_files(os.path.join(ckpts, "6")) is None
    resumed = loop.train(_albef_config(data_dir), workdir, progress=False)
    _assert_bit_equal(resumed["final_state"], reference[1])
    rows, ref_rows = _train_rows(workdir), _train_rows(reference[0])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def test_damaged_latest_checkpoint_resumes_from_the_previous_one(reference, tmp_path, caplog):
    """The newest step (8) has a truncated array file, a save left a partial directory
    and a kill tore the last metrics line: the run reports step 8 (naming the file),
    resumes from step 4, removes the partial save, re-does steps 5-8 and ends equal to
    the uninterrupted run, with every step once in metrics.jsonl."""
    import logging

    from mmjax.train import loop

    workdir = _copy(reference, tmp_path)
    ckpts = os.path.join(workdir, "checkpoints")
    files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(ckpts, "8", "state")) for n in ns]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    os.makedirs(os.path.join(ckpts, "10.orbax-checkpoint-tmp", "state"))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 9, "kind": "tr')
    with caplog.at_level(logging.WARNING):
        resumed = loop.train(_config_like(reference), workdir, progress=False)
    report = " ".join(r.getMessage() for r in caplog.records)
    assert "step 8" in report and os.path.relpath(victim, os.path.join(ckpts, "8")) in report
    _assert_bit_equal(resumed["final_state"], reference[1])
    assert [r["step"] for r in _train_rows(workdir)] == list(range(1, STEPS + 1))
    assert sorted(os.listdir(ckpts)) == ["4", "8", "8.damaged"]


def _config_like(reference):
    """The reference's config (its data_dir included), as a new run would load it."""
    from mmjax import workdir as workdir_lib

    data_dir = workdir_lib.load_config_json(reference[0]).data.data_dir
    return _albef_config(data_dir)


@pytest.mark.parametrize("damage", ["flipped_byte", "state_deleted"])
def test_params_readers_pass_over_a_damaged_step(reference, tmp_path, damage):
    """finetune --init-from / eval / export / embed read through setup.restore_params,
    the hf-clip exporter through hf_workdir.read_workdir_params:
    a damaged newest step gives the previous step's params; with every step damaged,
    one clear error (a ValueError: exit 2) that names the step and the file."""
    from mmjax.train import finetune
    from mmjax.train import setup as setup_lib

    workdir = _copy(reference, tmp_path)
    ckpts = os.path.join(workdir, "checkpoints")

    def damage_step(step):
        state = os.path.join(ckpts, str(step), "state")
        if damage == "state_deleted":
            shutil.rmtree(state)
            return
        files = [os.path.join(r, n) for r, _, ns in os.walk(state) for n in ns]
        path = max(files, key=os.path.getsize)
        data = bytearray(open(path, "rb").read())
        data[len(data) // 3] ^= 0x01
        open(path, "wb").write(bytes(data))

    damage_step(8)
    params, _, step = setup_lib.restore_params(workdir)
    assert step == 4
    # The hf-clip exporter reads params with orbax directly; it takes the same step.
    import jax

    from mmjax.export import hf_workdir

    assert hf_workdir.checkpoint_step(workdir) == 4
    _, exported = hf_workdir.read_workdir_params(workdir)
    for a, b in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert os.path.isdir(os.path.join(ckpts, "8"))  # a reader moves nothing
    damage_step(4)
    with pytest.raises(ValueError, match=r"no usable checkpoint .*step 8: state/.*step 4: state/"):
        finetune.pretrained_params(workdir)


def test_a_gradient_that_overflows_adam_changes_nothing():
    """A finite gradient of 1e20 squares to inf in Adam's second moment while the
    params stay finite (the update m / sqrt(nu) is 0): the step is bad and leaves the
    optimizer state as it was, instead of freezing that param for good."""
    import jax
    import jax.numpy as jnp
    import optax

    from mmjax.train import step as step_lib
    from mmjax.train.state import TrainState

    class Linear:
        def objective(self, params, batch, rng=None, **_):
            return jnp.sum(params["w"] * batch["x"]), {}, {}

        def project_params(self, params):
            return params

        def project_grads(self, params, grads):
            return grads

    params = {"w": jnp.ones(3)}
    opt = optax.adam(1e-3)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt.init(params),
        ema_params=None,
        queues=None,
        rng=jax.random.PRNGKey(0),
    )
    step = jax.jit(step_lib.make_train_step(Linear(), opt))
    new, metrics = step(state, {"x": jnp.asarray([1.0, 1e20, 1.0])})
    assert float(metrics["bad_step"]) == 1.0
    for a, b in zip(
        jax.tree_util.tree_leaves((new.params, new.opt_state)),
        jax.tree_util.tree_leaves((state.params, state.opt_state)),
    ):
        np.testing.assert_array_equal(a, b)
    new, metrics = step(new, {"x": jnp.asarray([1.0, 2.0, 1.0])})  # a normal batch then trains
    assert float(metrics["bad_step"]) == 0.0 and np.all(np.asarray(new.params["w"]) < 1.0)


def test_nan_batches_change_nothing_then_stop_the_run(reference, tmp_path, monkeypatch):
    """From step 3 on every image is NaN: steps 3-5 change neither params nor optimizer
    state, EMA teacher or queues (the checkpoint of step 4 equals step 2's bit for bit,
    and is finite), each is counted (bad_step / bad_steps), and after
    train.max_bad_steps=3 in a row the run stops with an error naming step 5."""
    from mmjax.data import pipeline
    from mmjax.train import guard, loop
    from mmjax.train import setup as setup_lib

    real = pipeline.make_train_iterator

    class Poisoned:  # the real iterator (its order_state, payload_bytes, ...), NaN images from batch 3 on
        def __init__(self, it):
            self.it, self.i = it, 0

        def __iter__(self):
            return self

        def __next__(self):
            batch, self.i = next(self.it), self.i + 1
            return dict(batch, image=np.full_like(batch["image"], np.nan)) if self.i > 2 else batch

        def __getattr__(self, name):
            return getattr(self.it, name)

    def poisoned(*args, **kw):
        return Poisoned(real(*args, **kw))

    monkeypatch.setattr(pipeline, "make_train_iterator", poisoned)
    workdir = str(tmp_path / "w")
    cfg = _config_like(reference)
    with cfg.unlocked():
        cfg.train.max_bad_steps, cfg.train.ckpt_every = 3, 2
    with pytest.raises(guard.NonFiniteError, match=r"step 5: .*3 steps in a row .*last checkpoint is step 4"):
        loop.train(cfg, workdir, progress=False)
    monkeypatch.undo()
    rows = _train_rows(workdir)
    assert [(r["step"], r["bad_step"], r["bad_steps"]) for r in rows] == [
        (1, 0, 0),
        (2, 0, 0),
        (3, 1, 1),
        (4, 1, 2),
        (5, 1, 3),
    ]
    setup = setup_lib.Setup(cfg, workdir)
    (two, _), (four, meta4) = setup.restore(step=2), setup.restore(step=4)
    setup.checkpointer.close()
    assert meta4["bad_steps"] == 2 and int(four.step) == 4
    two, four = _leaves(two), _leaves(four)
    for k in two:
        if k not in (".step", ".rng"):
            assert np.array_equal(two[k], four[k]) and np.all(np.isfinite(two[k])), k
    assert not np.array_equal(two[".rng"], four[".rng"])


def test_resume_with_another_model_shape_names_the_keys(reference, tmp_path):
    from mmjax.train import loop

    workdir = _copy(reference, tmp_path)
    cfg = _config_like(reference)
    with cfg.unlocked():
        cfg.model.embed_dim = 24
    with pytest.raises(ValueError, match=r"config differs from this run's in keys: model\.embed_dim \(16 -> 24\)"):
        loop.train(cfg, workdir, progress=False)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]  # nothing moved
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["embed_dim"] == 16  # the workdir still describes its checkpoints


def test_unwritable_workdir_is_one_clear_error(reference, tmp_path):
    """A workdir under a regular file, and a resume where config.json cannot be written
    (as in a read-only workdir; the tests run as root, so a directory stands in the way)."""
    from mmjax.train import loop

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="workdir .*a_file/w is not writable: Not a directory"):
        loop.train(_config_like(reference), str(tmp_path / "a_file" / "w"), progress=False)
    workdir = _copy(reference, tmp_path)
    os.makedirs(os.path.join(workdir, "config.json.tmp"))
    with pytest.raises(ValueError, match=r"workdir .* is not writable: .*config\.json\.tmp"):
        loop.train(_config_like(reference), workdir, progress=False)


def test_torn_metrics_line_is_tolerated_and_resume_truncates(tmp_path):
    from mmjax.train import metrics as metrics_lib

    rows = [{"step": s, "kind": "train", "loss": 1.0 / s} for s in range(1, 9)]
    rows.insert(4, {"step": 4, "kind": "eval", "i2t_r@1": 0.5})
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "kind": "tr'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 4, 5, 6, 7, 8]
    assert metrics_lib.truncate(str(tmp_path), 4) == 5
    assert [(r["step"], r["kind"]) for r in metrics_lib.read_metrics(str(tmp_path))] == [
        (1, "train"),
        (2, "train"),
        (3, "train"),
        (4, "train"),
        (4, "eval"),
    ]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")


def test_sigterm_on_one_of_two_processes_saves_the_same_step_on_both(tmp_path, data_dir, reference):
    """2 processes x 4 devices; SIGTERM reaches process 1 only. Both finish the same
    step, save it together and leave with exit code 143; the checkpoint's meta holds
    each process's data position."""
    from test_multiprocess import _launch, _wait

    from mmjax.train import guard

    os.makedirs(tmp_path / "w")  # the data and a tokenizer are ready: start-up is what it is
    shutil.copyfile(os.path.join(reference[0], "tokenizer.model"), tmp_path / "w" / "tokenizer.model")
    procs = _launch(
        tmp_path / "w",
        data_dir,
        2,
        (),
        **{"train.steps": 100000, "train.log_every": 1, "train.ckpt_every": 0, "eval.at_end": False},
    )
    metrics = tmp_path / "w" / "metrics.jsonl"
    t0 = time.time()
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.time() - t0 < 600 and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        codes, outs = _wait(procs, timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [guard.PREEMPTED_EXIT] * 2, "\n".join(o[-2000:] for o in outs)
    steps = os.listdir(tmp_path / "w" / "checkpoints")
    assert len(steps) == 1 and all(f"preempted: saved step {steps[0]}" in o for o in outs), outs
    with open(tmp_path / "w" / "checkpoints" / steps[0] / "meta" / "metadata") as f:
        meta = json.load(f)
    assert meta["data_position"] == int(steps[0])
    # Each process's own stream position (data_state), gathered by process 0.
    assert len(meta["records"]) == 2 and len(set(meta["records"])) == 2 and meta["skipped"] == [0, 0]


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2:]))
