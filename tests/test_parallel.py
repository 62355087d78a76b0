"""The parallel modes compute one function: a single device, pmap over 8 devices, and
jit on (data), (data, fsdp) and (data, fsdp, tensor) meshes give the same losses and
params for CLIP, SigLIP and ALBEF (queues, hard negatives, MLM masks); the state is
really sharded; every param carries logical names; pmap checkpoints resume on a mesh."""

import functools

import jax
import numpy as np
import pytest
from test_albef import _batch, _family

from mmjax.parallel import mesh as mesh_lib
from mmjax.parallel import sharding
from mmjax.parallel.collective import PmapCollective, identity
from mmjax.train import loop, optim
from mmjax.train import step as step_lib
from tiny import albef_config, tiny_config

STEPS = 3
MESHES = {
    "data8": {"data": 8},
    "data4_fsdp2": {"data": 4, "fsdp": 2},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def _setup(kind, tmp_path):
    """(family, train config, batches) for a tiny model of `kind`."""
    if kind == "albef":
        cfg = albef_config(tmp_path)
        family = _family(cfg)
    else:
        cfg = tiny_config(
            tmp_path,
            **{"model.loss": "sigmoid" if kind == "siglip" else "softmax", "model.text_overrides": "{'heads': 2}"},
        )
        family = _family(cfg)
    batches = [_batch(s) for s in range(STEPS)]
    if kind != "albef":
        batches = [{k: b[k] for k in ("image", "text")} for b in batches]
    return family, cfg.train, batches


def run(family, train_cfg, batches, mode, mesh_shape=None, devices=None):
    """Losses and final state (checkpoint layout) after len(batches) steps, driven the
    way `loop.train` drives them."""
    opt = optim.make_optimizer(train_cfg)
    mesh = mesh_lib.make_mesh(mesh_shape if mode == "mesh" else None, devices)
    init, abstract, shard = step_lib.state_plan(family, opt, mesh, (1, 16, 16, 3), (1, 16))
    if mode == "pmap":
        shard = jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract)
    state = jax.jit(init, out_shardings=shard)(jax.random.PRNGKey(0))
    if mode == "pmap":
        fn = step_lib.compile_pmap_step(step_lib.make_train_step(family, opt, collective=PmapCollective()))
        state = mesh_lib.to_pmap(state)
    else:
        fn = step_lib.compile_step(
            step_lib.make_train_step(family, opt, collective=identity),
            shard,
            mesh_lib.batch_sharding(mesh),
            mesh_lib.replicated(mesh),
            mesh=mesh,
        )
    losses = []
    for b in batches:
        b = mesh_lib.pmap_batch(b) if mode == "pmap" else mesh_lib.global_batch(mesh, b)
        state, m = fn(state, b)
        m = mesh_lib.unreplicate_metrics(m) if mode == "pmap" else jax.device_get(m)
        losses.append(float(m["loss"]))
    if mode == "pmap":
        state = mesh_lib.from_pmap(state, mesh)
    return np.array(losses), jax.tree.map(np.asarray, jax.device_get(state)), shard


@functools.lru_cache(maxsize=None)
def _reference(kind, tmp):
    family, tc, batches = _setup(kind, tmp)
    return run(family, tc, batches, "mesh", {"data": 1}, jax.devices()[:1])


@pytest.fixture(scope="module")
def tmp_data(tmp_path_factory):
    return tmp_path_factory.mktemp("par")


# CLIP on every mesh; SigLIP and ALBEF under pmap and on the mesh with all three axes
# (data, fsdp, tensor), which holds the one-axis meshes' collectives.
CASES = [("clip", m) for m in ["pmap", *MESHES]] + [
    (k, m) for k in ("siglip", "albef") for m in ("pmap", "data2_fsdp2_tensor2")
]


@pytest.mark.parametrize("kind,mode", CASES)
def test_modes_match_single_device(kind, mode, tmp_data):
    ref_loss, ref_state, _ = _reference(kind, str(tmp_data))
    family, tc, batches = _setup(kind, str(tmp_data))
    if mode == "pmap":
        loss, state, _ = run(family, tc, batches, "pmap")
    else:
        loss, state, shard = run(family, tc, batches, "mesh", MESHES[mode])
        # The params really are split as the rules say (not replicated everywhere).
        specs = {sharding.path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shard.params)[0]}
        if "fsdp" in mode:
            assert any("fsdp" in str(s) for s in specs.values())
        if "tensor" in mode:
            assert any("tensor" in str(s) for s in specs.values())
    assert ref_loss[0] > 0 and np.all(np.isfinite(loss))
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=2e-5)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_state)
    flat = dict((sharding.path_str(p), v) for p, v in jax.tree_util.tree_leaves_with_path(state))
    for p, v in flat_ref:
        np.testing.assert_allclose(flat[sharding.path_str(p)], v, rtol=1e-4, atol=2e-5, err_msg=sharding.path_str(p))


@pytest.mark.parametrize("kind", ["clip", "albef", "vlmo", "beit3"])
def test_every_param_has_logical_names(kind, tmp_data):
    if kind in ("vlmo", "beit3"):
        from test_vlmo import tiny

        family = _family(tiny(kind, str(tmp_data)))
    else:
        family, _, _ = _setup(kind, str(tmp_data))
    boxed = jax.eval_shape(lambda r: family.init_params(r, (1, 16, 16, 3), (1, 16), boxed=True), jax.random.PRNGKey(0))
    assert sharding.unnamed_params(boxed) == []


def test_fsdp_divides_state_bytes(tmp_data):
    """Under fsdp=8, the params + optimizer + EMA + queues bytes a device holds are
    close to 1/8 of the replicated bytes (scalars and indivisible dims stay whole)."""
    family, tc, _ = _setup("albef", str(tmp_data))
    opt = optim.make_optimizer(tc)
    full = sharding.bytes_per_device(
        *step_lib.state_plan(family, opt, mesh_lib.make_mesh({"data": 8}), (1, 16, 16, 3), (1, 16))[1:]
    )
    _, abstract, shard = step_lib.state_plan(family, opt, mesh_lib.make_mesh({"fsdp": 8}), (1, 16, 16, 3), (1, 16))
    ratio = sharding.bytes_per_device(abstract, shard) / full
    assert 1 / 8 <= ratio < 0.16, ratio


def test_rules_drop_axes_that_do_not_divide():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.mesh_axes(("embed", "mlp"), (64, 256), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert sharding.mesh_axes(("embed", "heads", "kv"), (64, 3, 8), mesh) == jax.sharding.PartitionSpec(
        "fsdp", None, None
    )
    assert sharding.mesh_axes(("batch", None), (8, 3), mesh) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="no rule"):
        sharding.mesh_axes(("bogus",), (4,), mesh)
    with pytest.raises(ValueError, match="devices"):
        mesh_lib.make_mesh({"data": 3})
    with pytest.raises(ValueError, match="unknown axes"):
        mesh_lib.make_mesh({"model": 8})


def test_pmap_checkpoint_resumes_on_mesh(tmp_path, tmp_data):
    """10 steps under pmap, then 10 more on a (data=4, fsdp=2) mesh from its checkpoint,
    equal the same 20 steps run on that mesh without a break."""
    common = {"train.steps": 20, "train.ckpt_every": 10}
    mesh = {"parallel.mode": "mesh", "parallel.mesh": "{'data': 4, 'fsdp': 2}"}
    cfg = lambda **kw: tiny_config(tmp_data, **common, **kw)
    loop.train(cfg(**{"parallel.mode": "pmap"}), str(tmp_path / "a"), progress=False, stop_at=10)
    resumed = loop.train(cfg(**mesh), str(tmp_path / "a"), progress=False)
    straight = loop.train(cfg(**mesh), str(tmp_path / "b"), progress=False)
    for a, b in zip(jax.tree.leaves(resumed["final_state"].params), jax.tree.leaves(straight["final_state"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    assert int(resumed["final_state"].step) == 20
