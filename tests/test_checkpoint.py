"""Checkpoints: round trip onto the mesh, and an interrupted save loses nothing."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import checkpoint as ckpt_lib
from mmjax.parallel import mesh as mesh_lib
from mmjax.train.state import TrainState


def _state(seed):
    k = jax.random.PRNGKey(seed)
    params = {"w": jax.random.normal(k, (8, 4)), "b": jnp.arange(4.0) + seed}
    return TrainState(step=jnp.asarray(seed, jnp.int32), params=params, opt_state={"mu": params},
                      ema_params=None, queues=None, rng=jax.random.PRNGKey(seed + 100))


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
