"""Checkpoints: round trip onto the mesh, an interrupted save loses nothing, a damaged
step is reported and passed over, a failed save is named and keeps the last good step."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import checkpoint as ckpt_lib
from mmjax import checkpoint_manifest as manifest_lib
from mmjax.parallel import mesh as mesh_lib
from mmjax.train.state import TrainState


def _state(seed):
    k = jax.random.PRNGKey(seed)
    params = {"w": jax.random.normal(k, (8, 4)), "b": jnp.arange(4.0) + seed}
    return TrainState(
        step=jnp.asarray(seed, jnp.int32),
        params=params,
        opt_state={"mu": params},
        ema_params=None,
        queues=None,
        rng=jax.random.PRNGKey(seed + 100),
    )


def _restore(directory, like):
    mesh = mesh_lib.make_mesh({"data": -1})
    shardings = jax.tree_util.tree_map(lambda _: mesh_lib.replicated(mesh), like)
    target = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: like), shardings)
    ck = ckpt_lib.Checkpointer(directory)
    try:
        return ck.latest_step(), ck.restore(target)
    finally:
        ck.close()


def test_round_trip_onto_mesh(tmp_path):
    ck = ckpt_lib.Checkpointer(str(tmp_path))
    ck.save(3, _state(3), {"data_position": 3})
    ck.close()
    step, (state, meta) = _restore(str(tmp_path), _state(0))
    assert step == 3 and meta["data_position"] == 3
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(_state(3))):
        np.testing.assert_array_equal(a, b)
    assert state.params["w"].sharding.is_fully_replicated and len(state.params["w"].sharding.device_set) == 8


def test_interrupted_save_keeps_last_good(tmp_path):
    """A save that died half-way (its temporary directory left behind, as orbax
    leaves it before the final rename) is invisible: the last good step restores."""
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    ck.save(5, _state(5), {"data_position": 5})
    ck.close()
    partial = tmp_path / "9.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(os.urandom(64))
    step, (state, meta) = _restore(str(tmp_path), _state(0))
    assert step == 5 and meta["data_position"] == 5
    np.testing.assert_array_equal(state.params["w"], _state(5).params["w"])
    # Saving again after the failure works and becomes the latest.
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    ck.save(9, _state(9), {"data_position": 9})
    ck.close()
    step, (state, _) = _restore(str(tmp_path), _state(0))
    assert step == 9
    np.testing.assert_array_equal(state.params["b"], _state(9).params["b"])


# ---------------------------------------------------------------- damage, keep-N, full disk


def _two_steps(directory, keep=3, async_save=True):
    ck = ckpt_lib.Checkpointer(str(directory), keep=keep, async_save=async_save)
    ck.save(2, _state(2), {"data_position": 2})
    ck.save(4, _state(4), {"data_position": 4})
    ck.close()


def _largest_array_file(step_dir):
    files = [
        os.path.join(r, n)
        for r, _, ns in os.walk(step_dir / "state")
        for n in ns
        if os.sep + "d" + os.sep in os.path.join(r, n)
    ]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return "bytes"


def _flip(step_dir):
    path = _largest_array_file(step_dir)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    return "CRC32"


def _drop_state(step_dir):
    import shutil

    shutil.rmtree(step_dir / "state")
    return "state/"


def _empty(step_dir):
    import shutil

    shutil.rmtree(step_dir)
    step_dir.mkdir()
    return "empty"


def _meta_without_position(step_dir):
    (step_dir / "meta" / "metadata").write_text('{"other": 1}')
    return "meta/metadata"


DAMAGE = {
    "truncated": _truncate,
    "flipped_byte": _flip,
    "state_deleted": _drop_state,
    "empty_dir": _empty,
    "meta_without_position": _meta_without_position,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("manifest", [True, False], ids=["verified", "unverified"])
def test_damaged_latest_falls_back_to_previous(tmp_path, caplog, damage, manifest):
    """The newest step damaged (as a crash or a disk would): it is reported, naming the
    step and the file, and the previous step restores. Without a manifest (a step saved
    by an older mmjax) changed bytes cannot be seen (a flipped byte, or a cut in bytes
    that a read may not reach); a missing item, an empty step or a meta without the data
    position still are."""
    _two_steps(tmp_path)
    if not manifest:
        for s in (2, 4):
            os.remove(tmp_path / str(s) / ckpt_lib.MANIFEST)
        if damage in ("flipped_byte", "truncated"):
            pytest.skip("undetectable without checksums")
    what = DAMAGE[damage](tmp_path / "4")
    with caplog.at_level(logging.WARNING, logger="mmjax.checkpoint"):
        mesh = mesh_lib.make_mesh({"data": -1})
        like = _state(0)
        shardings = jax.tree_util.tree_map(lambda _: mesh_lib.replicated(mesh), like)
        target = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: like), shardings)
        ck = ckpt_lib.Checkpointer(str(tmp_path))
        state, meta = ck.restore(target, require=("data_position",), quarantine=True)
        ck.close()
    assert ck.restored_step == 2 and meta["data_position"] == 2
    np.testing.assert_array_equal(state.params["w"], _state(2).params["w"])
    report = " ".join(r.getMessage() for r in caplog.records)
    assert "step 4" in report and (what in report or not manifest), report
    # The unusable step is set aside, so this run can save step 4 again.
    assert os.path.isdir(tmp_path / "4.damaged") and not os.path.exists(tmp_path / "4")
    ck = ckpt_lib.Checkpointer(str(tmp_path))
    ck.save(4, _state(4), {"data_position": 4})
    ck.close()
    assert manifest_lib.verify_files(str(tmp_path / "4")) is None


def test_no_usable_step_is_one_clear_error(tmp_path):
    _two_steps(tmp_path)
    _flip(tmp_path / "4")
    _drop_state(tmp_path / "2")
    with pytest.raises(ckpt_lib.CheckpointError, match=r"step 4: .*CRC32.*step 2: state/\S+ is missing"):
        _restore(str(tmp_path), _state(0))
    assert os.path.isdir(tmp_path / "4") and os.path.isdir(tmp_path / "2")  # nothing moved when nothing restores


def _no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def _fail_orbax_commit(monkeypatch):
    """orbax's background commit fails once its writes are done, with the error
    TensorStore gives on a full disk."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer as ac

    real = ac._background_wait_for_commit_futures

    def failing(directory, commit_futures, on_commit_callback, **kw):
        def full():
            raise ValueError(
                f'RESOURCE_EXHAUSTED: Error writing local file "{directory}/state/_sharding.__lock": '
                "[OS error 28: No space left on device]"
            )

        return real(directory, commit_futures, full, **kw)

    monkeypatch.setattr(ac, "_background_wait_for_commit_futures", failing)


@pytest.mark.parametrize("where", ["orbax_write", "background_manifest"])
def test_disk_full_is_named_and_keeps_the_last_good_step(tmp_path, monkeypatch, where):
    """keep=1: the save of step 4 fails as on a full disk, in orbax's write of an item
    or in the background thread that seals the step. The error says which step failed
    and which one is good; step 2 is still there and verified (orbax's own keep-N
    deletes it even when the new save failed); the partial step is gone by the next start."""
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
    ck.save(2, _state(2), {"data_position": 2})
    ck.wait()
    if where == "orbax_write":
        _fail_orbax_commit(monkeypatch)
    else:
        monkeypatch.setattr(ckpt_lib, "write_manifest", _no_space)
    with pytest.raises(ckpt_lib.SaveError, match="disk full while saving step 4 .*the last good checkpoint is step 2"):
        ck.save(4, _state(4), {"data_position": 4})
        ck.wait()
    monkeypatch.undo()
    ck.close()
    ckpt_lib.Checkpointer(str(tmp_path)).remove_partial_saves()  # the next start (writes may still land until then)
    assert sorted(os.listdir(tmp_path)) == ["2"] and manifest_lib.verify_files(str(tmp_path / "2")) is None
    assert isinstance(ckpt_lib.SaveError("x"), ValueError)  # the CLI's exit 2, one line


def test_keep_n_counts_only_final_verified_steps(tmp_path):
    """keep=2 after steps 2, 4, 6, 8: the two newest stay. A step that never got its
    manifest (an older mmjax, or a kill between a synchronous save and its manifest)
    does not count as one of the N."""
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
    for s in (2, 4, 6):
        ck.save(s, _state(s), {"data_position": s})
    assert ck.steps() == [4, 6]
    os.remove(tmp_path / "6" / ckpt_lib.MANIFEST)
    ck.save(8, _state(8), {"data_position": 8})
    ck.close()
    assert ck.steps() == [4, 6, 8]


def test_a_save_orbax_names_otherwise_is_still_sealed(tmp_path, monkeypatch):
    """Where the temporary directory is not `STEP.orbax-checkpoint-tmp` (other orbax
    versions add a timestamp; some file systems save in place), the seal callback finds
    none and the manifest is written once the step is final: every step verifies."""
    monkeypatch.setattr(ckpt_lib.Checkpointer, "_tmp_dirs", lambda self, step: [])
    _two_steps(tmp_path)
    for step in (2, 4):
        manifest = ckpt_lib.read_manifest(str(tmp_path / str(step)))
        assert manifest is not None and manifest["step"] == step
        assert manifest_lib.verify_files(str(tmp_path / str(step))) is None


def test_partial_saves_are_removed_on_the_next_start(tmp_path):
    _two_steps(tmp_path)
    (tmp_path / f"6{ckpt_lib.TMP_SUFFIX}" / "state").mkdir(parents=True)
    ck = ckpt_lib.Checkpointer(str(tmp_path))
    assert ck.remove_partial_saves() == [f"6{ckpt_lib.TMP_SUFFIX}"]
    ck.close()
    assert sorted(os.listdir(tmp_path)) == ["2", "4"]


def test_another_state_shape_is_named_before_reading(tmp_path):
    _two_steps(tmp_path)
    other = _state(0).replace(params={"w": jnp.zeros((8, 5)), "b": jnp.zeros(4)})
    with pytest.raises(ckpt_lib.StateMismatch, match=r"\.params\['w'\] \(8, 4\) in the checkpoint, \(8, 5\) here"):
        _restore(str(tmp_path), other)


def test_usable_step_for_readers_that_open_a_step_themselves(tmp_path):
    _two_steps(tmp_path)
    assert ckpt_lib.usable_step(str(tmp_path)) == 4
    _truncate(tmp_path / "4")
    assert ckpt_lib.usable_step(str(tmp_path)) == 2
    with pytest.raises(ckpt_lib.CheckpointError, match="step 4: .*truncated"):
        ckpt_lib.usable_step(str(tmp_path), 4)
