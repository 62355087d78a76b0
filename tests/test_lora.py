"""LoRA on the decoder LM (mmjax/models/lora.py): adapters == their merge into the kernels
(unrolled and scanned + remat), a fresh adapter is a no-op, the freeze regex leaves exactly
the adapters (and non-LM params) trainable, cached generation == uncached, and every
adapter param has logical axis names."""

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.generate import generate
from mmjax.models.llm import DecoderLM, LMSpec, init_params, lm_mask, stack_layers
from mmjax.models.lora import join_lora, lora_freeze_regex, merge_lora, split_lora
from mmjax.parallel.mesh import make_mesh
from mmjax.parallel.sharding import mesh_axes, path_str
from mmjax.train.optim import trainable_mask

# The visual expert and q/k/v biases on: the expert's projections get adapters too.
SPEC = LMSpec(vocab_size=40, width=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=48)
EXPERT = dataclasses.replace(SPEC, visual_expert=True, qkv_bias=True)
R, ALPHA = 4, 8.0
TARGETS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
QKV, GATE = (("embed",), ("heads", "kv")), (("embed",), ("mlp",))
# Each target's kernel's (input, output) logical names.
AXES = {
    "q": QKV,
    "k": QKV,
    "v": QKV,
    "o": (("heads", "kv"), ("embed",)),
    "gate": GATE,
    "up": GATE,
    "down": (("mlp",), ("embed",)),
}


def _params(spec, seed=0, zero_b=False, **module_kw):
    """Random LoRA params (numpy, shapes from an abstract init: no init compile): kernels and
    adapters' a ~ N(0, 1 / fan_in), norm scales around 1, b ~ N(0, 0.01) so the adapters
    matter (`zero_b`: zeros, a fresh adapter)."""
    make = partial(init_params, spec, lora_rank=R, lora_alpha=ALPHA, **module_kw)
    shapes = jax.eval_shape(make, jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def one(path, x):
        name, z = path_str(path), rng.normal(size=x.shape)
        if name.endswith("_lora/b"):
            z = 0.0 * z if zero_b else 0.1 * z
        elif "scale" in name:
            z = 1.0 + 0.2 * z
        elif "bias" in name:
            z = 0.3 * z
        elif "embedding" not in name:
            z = z / np.sqrt(x.shape[-2] if name.endswith("_lora/a") else x.shape[0])
        return jnp.asarray(z, x.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


def _batch(b=2, n=6):
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(1, 40, (b, n)), jnp.int32)
    valid = jnp.asarray(np.arange(n)[None] >= np.array([[0], [2]]))  # row 1 left-padded
    expert = jnp.zeros((b, n), bool).at[:, 2:4].set(True)
    positions = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
    return ids, positions, lm_mask(valid), expert


@partial(jax.jit, static_argnums=0)
def _forward(lm, params, ids, positions, mask, expert):
    return lm.apply({"params": params}, ids, positions, mask, expert, method="forward_ids")


@partial(jax.jit, static_argnums=0)
def _cached_forward(lm, params, ids, positions, mask, expert):
    """forward_ids through an empty KV cache as long as the input (lm.decode=True)."""
    x = jax.ShapeDtypeStruct(ids.shape + (lm.spec.width,), jnp.float32)
    make = lambda x: lm.apply({"params": params}, x, positions, None, mutable=["cache"])[1]["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(make, x))
    variables = {"params": params, "cache": cache}
    return lm.apply(variables, ids, positions, mask, expert, method="forward_ids", mutable=["cache"])[0]


def _lora_paths(tree):
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0] if "_lora/" in path_str(p)]


@pytest.mark.parametrize("scan", [False, True])
def test_lora_equals_merged_kernels(scan):
    module_kw = dict(scan=True, remat="full") if scan else {}
    params = _params(EXPERT)
    params = stack_layers(params, EXPERT.depth) if scan else params
    batch = _batch()
    got = _forward(DecoderLM(EXPERT, lora_rank=R, lora_alpha=ALPHA, **module_kw), params, *batch)
    merged = jax.jit(partial(merge_lora, rank=R, alpha=ALPHA))(params)
    plain = jax.eval_shape(partial(init_params, EXPERT, **module_kw), jax.random.PRNGKey(0))
    assert jax.tree.structure(merged) == jax.tree.structure(plain)
    want = _forward(DecoderLM(EXPERT, **module_kw), merged, *batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    base = _forward(DecoderLM(EXPERT, **module_kw), split_lora(params)[0], *batch)
    assert np.abs(np.asarray(got) - np.asarray(base)).max() > 0.1  # the adapters matter
    # 7 adapters per attention + MLP pair, the expert's too, each {a, b}.
    assert len(_lora_paths(params)) == 2 * 2 * 7 * (1 if scan else EXPERT.depth)
    # decode=True: a prompt written into an empty KV cache gives the same logits.
    cached = _cached_forward(DecoderLM(EXPERT, lora_rank=R, lora_alpha=ALPHA, decode=True, **module_kw), params, *batch)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(got), rtol=1e-5, atol=1e-5)


def test_fresh_adapters_are_a_no_op_and_split_join_round_trip():
    params = _params(EXPERT, seed=3, zero_b=True)
    base, lora = split_lora(params)
    plain = jax.eval_shape(partial(init_params, EXPERT), jax.random.PRNGKey(0))
    assert jax.tree.structure(base) == jax.tree.structure(plain)
    assert sorted(lora["layer00"]) == ["attn", "attn_img", "mlp", "mlp_img"]
    assert sorted(lora["layer00"]["mlp"]) == ["down_lora", "gate_lora", "up_lora"]
    jax.tree.map(np.testing.assert_array_equal, join_lora(base, lora), params)
    batch = _batch()
    got = _forward(DecoderLM(EXPERT, lora_rank=R, lora_alpha=ALPHA), params, *batch)
    want = _forward(DecoderLM(EXPERT), base, *batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_freeze_regex_selects_exactly_the_non_lora_lm_params(scan):
    make = partial(init_params, EXPERT, lora_rank=R, scan=scan)
    tree = {"lm": jax.eval_shape(make, jax.random.PRNGKey(0)), "projector": {"fc1": {"kernel": jnp.zeros((3, 4))}}}
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    for train_expert in (False, True):
        mask = trainable_mask(tree, [lora_freeze_regex("lm/", train_expert=train_expert)])
        got = dict(zip(paths, jax.tree.leaves(mask)))
        for path, trainable in got.items():
            expect = "_lora/" in path or path.startswith("projector/") or (train_expert and "_img/" in path)
            assert trainable == expect, path
    assert lora_freeze_regex() == "^lm/(?!.*_lora/)"


def test_frozen_base_gets_zero_updates_and_adapters_train():
    params = _params(EXPERT)
    tree = {"lm": params, "projector": {"kernel": jnp.ones((2, 2))}}
    mask = trainable_mask(tree, [lora_freeze_regex()])
    lm = DecoderLM(EXPERT, lora_rank=R, lora_alpha=ALPHA)

    def loss(t):
        logits = lm.apply({"params": t["lm"]}, *_batch(), method="forward_ids")
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.sum(t["projector"]["kernel"] ** 2)

    grads = jax.jit(jax.grad(loss))(tree)
    frozen = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)  # what train.freeze does
    for (path, g), raw in zip(jax.tree_util.tree_flatten_with_path(frozen)[0], jax.tree.leaves(grads)):
        name = path_str(path)
        if "_lora/" in name:
            assert np.abs(np.asarray(g)).max() > 0, name  # every adapter gets a gradient
        elif name.startswith("lm/"):
            assert not np.asarray(g).any(), name
            if name.endswith("/kernel"):
                assert np.abs(np.asarray(raw)).max() > 0, name  # the base kernels had one before freezing


def test_cached_generation_with_lora_equals_uncached():
    params = _params(EXPERT, seed=4)
    lm = DecoderLM(EXPERT, lora_rank=R, lora_alpha=ALPHA)
    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.integers(1, 40, (2, 4)), jnp.int32)
    valid = jnp.asarray(np.arange(4)[None] >= np.array([[0], [2]]))
    x = lm.apply({"params": params}, ids, method="embed")
    kw = dict(max_new_tokens=5, eos_ids=(), pad_id=0, prompt_expert_BxP=valid & (ids % 2 == 0))
    cached, scores = generate(lm, params, x, valid, **kw)
    uncached, plain_scores = generate(lm, params, x, valid, **kw, use_cache=False)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(plain_scores), rtol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_every_lora_param_has_logical_axes_that_shard(scan):
    boxed = jax.eval_shape(partial(init_params, EXPERT, lora_rank=R, scan=scan, boxed=True), jax.random.PRNGKey(0))
    specs = nn.get_partition_spec(boxed)
    flat = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: s is None)[0]}
    stack = ("layers",) if scan else ()
    layer = "layers" if scan else "layer01"
    for block, targets in TARGETS.items():
        for sub in (block, f"{block}_img"):
            for t in targets:
                ins, outs = AXES[t]
                assert tuple(flat[f"{layer}/{sub}/{t}_lora/a"]) == stack + ins + (None,)
                assert tuple(flat[f"{layer}/{sub}/{t}_lora/b"]) == stack + (None,) + outs
    lora = [p for p in flat if "_lora/" in p]
    assert lora and all(flat[p] is not None for p in lora)
    # On a data x fsdp x tensor mesh: a's input width over fsdp / heads over tensor, b's output side.
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shapes = {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]}
    want = {
        "attn/q_lora": (("fsdp", None), (None, "tensor", None)),
        "attn/o_lora": (("tensor", None, None), (None, "fsdp")),
    }
    want["mlp/down_lora"] = (("tensor", None), (None, "fsdp"))
    for sub, (a, b) in want.items():
        for name, axes in (("a", a), ("b", b)):
            path = f"{layer}/{sub}/{name}"
            assert tuple(mesh_axes(flat[path], shapes[path], mesh))[len(stack) :] == axes, path


def test_merge_lora_errors():
    params = jax.eval_shape(partial(init_params, SPEC, lora_rank=R), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="rank"):
        jax.eval_shape(partial(merge_lora, rank=2, alpha=ALPHA), params)
    with pytest.raises(ValueError, match="lora_rank"):
        jax.eval_shape(partial(init_params, SPEC, lora_rank=-1), jax.random.PRNGKey(0))
