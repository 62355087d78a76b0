"""Speed switches compute the same function: attention padding (and, on a GPU,
cuDNN flash attention), remat policies, bf16 Adam moments; and `mmjax bench`'s
report and largest-batch search."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import bench, cli
from mmjax import config as config_lib
from mmjax.models.attention import MultiHeadAttention, attend, causal_mask, combine_masks, padding_mask
from tiny import ROOT

TINY = [
    "data.image_size=16",
    "data.text_len=12",
    "data.tokenizer.vocab_size=50",
    "train.batch_size=8",
    "model.image_overrides={'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}",
]


def _reference_attention(q, k, v, mask):
    """numpy softmax(q k^T / sqrt(d)) v, rows with nothing to attend -> 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    m = np.broadcast_to(np.asarray(mask), s.shape) if mask is not None else np.ones(s.shape, bool)
    s = np.where(m, s, -np.inf)
    mx = np.max(np.where(m, s, -1e30), axis=-1, keepdims=True)
    p = np.where(m, np.exp(s - mx), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("spec", ["xla", "xla/16", "xla/5"])
@pytest.mark.parametrize("masked", [False, True])
def test_padded_attention_equals_numpy(spec, masked):
    rng = np.random.default_rng(0)
    b, lq, lk, h, d = 2, 11, 13, 2, 4
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))
    mask = None
    if masked:
        valid = np.arange(lk)[None] < np.array([[9], [13]])
        mask = jnp.asarray(valid)[:, None, None, :] & jnp.asarray(rng.random((1, 1, lq, lk)) > 0.2)
        mask = mask.at[0, 0, 3].set(False)  # a query row with nothing to attend
    got = attend(q, k, v, mask, spec)
    assert got.shape == (b, lq, h, d)
    np.testing.assert_allclose(np.asarray(got), _reference_attention(q, k, v, mask), atol=2e-5)


def _loss_and_grads(cfg_name, extra, seed=0):
    small = {
        "demo": ["model.text_overrides={'width': 32, 'depth': 1, 'heads': 2, 'mlp_dim': 64}"],
        "albef": [
            "model.text_overrides={'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}",
            "model.fusion_from=1",
            "model.queue_size=16",
        ],
        "vlmo": ["model.vl_from=1"],
        "beit3": [],
        "blip": ["model.text_overrides={'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}", "model.queue_size=16"],
        "video_clip:divided": ["data.num_frames=2"],
    }[cfg_name]
    path, _, arg = cfg_name.partition(":")
    cfg = config_lib.load(f"{ROOT}/configs/{path}.py" + (f":{arg}" if arg else ""), TINY + small + extra)
    fam, *_ = bench._prepare(cfg)
    batch = {k: jnp.asarray(v) for k, v in bench.synthetic_batch(cfg, fam, 8, seed).items()}
    params = fam.init_params(jax.random.PRNGKey(seed))
    kw = {}
    if fam.can("teacher"):
        ex = fam.init_extra(params)
        kw = dict(teacher=ex["ema_params"], queues=ex["queues"], step=jnp.zeros((), jnp.int32))

    def f(p):
        return fam.objective(p, batch, jax.random.PRNGKey(1), **kw)[0]

    return jax.jit(jax.value_and_grad(f))(params)


@pytest.mark.parametrize("name", ["demo", "albef", "beit3", "blip", "video_clip:divided"])
def test_switches_give_the_same_loss_and_gradients(name):
    """Padding attention lengths to 16 and each remat policy change nothing but speed
    and memory: same loss, same gradients as the plain model (float32). One multiway
    family (BEiT-3) stands for both: VLMo runs the same blocks."""
    loss0, g0 = _loss_and_grads(name, [])
    for extra in (["model.attention=xla/16", "model.remat=full"], ["model.remat=dots"]):
        loss, g = _loss_and_grads(name, extra)
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5, err_msg=str(extra))
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g)):
            # Recomputation reorders float32 sums: the absolute error of a leaf scales
            # with its largest entries (an ALBEF leaf of magnitude 2.4 differed by 2.3e-6
            # in an entry of 1.2e-4).
            atol = 2e-6 * max(1.0, float(np.max(np.abs(np.asarray(a)))))
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=atol, err_msg=str(extra))


def test_remat_policies_are_in_the_program():
    """'full' recomputes the forward (more matmuls in the compiled backward), 'dots'
    keeps the matmul outputs (no recomputed matmuls), so they are not no-ops."""
    from mmjax import flops

    def count(extra):
        cfg = config_lib.load(f"{ROOT}/configs/demo.py", TINY + extra)
        fam, *_ = bench._prepare(cfg)
        batch = bench.synthetic_batch(cfg, fam, 8)
        params = fam.init_params(jax.random.PRNGKey(0))
        return flops.count_dot_flops(jax.grad(lambda p: fam.objective(p, batch, jax.random.PRNGKey(1))[0]), params)

    none, full, dots = count([]), count(["model.remat=full"]), count(["model.remat=dots"])
    assert full > none  # the recomputed forward shows up as extra matmuls in the jaxpr
    assert none <= dots <= full


def test_bf16_adam_moments():
    cfg = config_lib.load(f"{ROOT}/configs/demo.py", TINY + ["train.mu_dtype=bfloat16"])
    fam, opt, mesh, trainable, init, abstract, shard = bench._prepare(cfg)
    mus = [x for x in jax.tree.leaves(abstract.opt_state) if x.ndim >= 2]
    assert mus and any(x.dtype == jnp.bfloat16 for x in mus) and any(x.dtype == jnp.float32 for x in mus)
    # One step agrees with the float32-moment step to bf16 precision.
    ref = config_lib.load(f"{ROOT}/configs/demo.py", TINY)
    out = []
    for c in (cfg, ref):
        fam, opt, mesh, trainable, init, abstract, shard = bench._prepare(c)
        state = jax.jit(init, out_shardings=shard)(jax.random.PRNGKey(0))
        fn = bench._compiled_step(c, fam, opt, mesh, trainable, shard)
        batch = bench.synthetic_batch(c, fam, 8)
        from mmjax.parallel import mesh as mesh_lib

        state, m = fn(state, mesh_lib.global_batch(mesh, batch))
        state, m = fn(state, mesh_lib.global_batch(mesh, batch))
        out.append(float(m["loss"]))
    assert out[0] == pytest.approx(out[1], rel=1e-2)


def test_attention_spec_errors():
    with pytest.raises(config_lib.ConfigError, match="model.attention"):
        config_lib.load(f"{ROOT}/configs/demo.py", ["model.attention=cudnn/0"])
    with pytest.raises(config_lib.ConfigError, match="valid choices: none, full, dots"):
        config_lib.load(f"{ROOT}/configs/demo.py", ["model.remat=some"])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_attention_matches_xla_on_gpu():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 197, 64)), jnp.bfloat16)
    valid = jnp.asarray(np.arange(197)[None] < np.array([[197], [150], [90], [197]]))
    mask = combine_masks(padding_mask(valid), causal_mask(197))
    for m in (None, mask):
        mha = lambda spec: MultiHeadAttention(4, attention=spec, dtype=jnp.bfloat16)
        params = mha("xla").init(jax.random.PRNGKey(0), x, mask=m)
        want = mha("xla").apply(params, x, mask=m)
        got = mha("cudnn/16").apply(params, x, mask=m)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2)


def test_bench_reports_flops_mfu_and_max_batch(capsys):
    rc = cli.main(
        [
            "bench",
            "--config",
            f"{ROOT}/configs/demo.py",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch-size",
            "16",
            *[f"--config.{o}" for o in TINY if not o.startswith("train.batch")],
        ]
    )
    assert rc == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["batch_size"] == 16
    want_tflops = row["gflops_per_sample"] * 1e9 * 16 / (row["ms_per_step"] / 1000) / row["devices"] / 1e12
    assert row["model_tflops_per_device"] == pytest.approx(want_tflops, rel=1e-3)
    assert row["mfu"] == pytest.approx(row["model_tflops_per_device"] / row["matmul_tflops"], rel=1e-4)
    assert 0 < row["mfu"] < 2 and row["matmul_tflops"] > 0 and row["compile_s"] > 0
    assert "ema_queue_ms" not in row  # CLIP has no teacher (tests/test_bench.py times ALBEF's)
    # The largest batch whose compiled step fits a memory limit (compiled, not run):
    # the batch found fits and the next multiple does not.
    cfg = config_lib.load(f"{ROOT}/configs/demo.py", TINY)

    def need(b):
        c = cfg.copy_and_resolve_references()
        with c.unlocked():
            c.train.batch_size = b
        return bench.step_bytes(bench.memory_plan(c))

    limit = (need(32) + need(64)) // 2
    assert need(32) < limit < need(64)
    got = bench.max_batch(cfg, limit_bytes=limit, multiple=16, upper=256)
    assert got["batch_size"] in (32, 48) and got["probes"] <= 5
    assert got["bytes"] <= limit < got["next_bytes"]


def test_scanned_layers_compute_the_unrolled_model():
    """model.scan_layers=True: params stacked under encoder/blocks (named 'layers' for
    sharding); with the unrolled params stacked, the same loss and gradients; a
    checkpoint moves between the layouts (transplant) and exports to HF unrolled."""
    from mmjax.export import hf_clip_weights
    from mmjax.models.transformer import stack_blocks
    from mmjax.parallel.sharding import unnamed_params
    from mmjax.train import finetune

    base = TINY + ["model.text_overrides={'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}"]
    cfgs = [config_lib.load(f"{ROOT}/configs/demo.py", base + [f"model.scan_layers={s}"]) for s in ("false", "true")]
    fams = [bench._prepare(c)[0] for c in cfgs]
    unrolled = fams[0].init_params(jax.random.PRNGKey(0))
    boxed = fams[1].init_params(jax.random.PRNGKey(0), boxed=True)
    assert not unnamed_params(boxed)
    stacked = jax.tree.map(lambda x: x, unrolled)
    for tower, depth in (("image_tower", 2), ("text_tower", 2)):
        enc = stacked[tower]["encoder"]
        stacked[tower]["encoder"] = stack_blocks(enc, depth)
    shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
    assert shapes(stacked) == shapes(jax.tree.map(lambda x: x, __import__("flax").linen.unbox(boxed)))
    batch = {k: jnp.asarray(v) for k, v in bench.synthetic_batch(cfgs[0], fams[0], 8).items()}
    outs = [
        jax.jit(jax.value_and_grad(lambda p, f=f: f.objective(p, batch, jax.random.PRNGKey(1))[0]))(p)
        for f, p in zip(fams, (unrolled, stacked))
    ]
    np.testing.assert_allclose(float(outs[1][0]), float(outs[0][0]), rtol=1e-5)
    g_unrolled = dict(outs[0][1])
    for tower in ("image_tower", "text_tower"):
        g_unrolled[tower] = dict(g_unrolled[tower], encoder=stack_blocks(outs[0][1][tower]["encoder"], 2))
    for a, b in zip(jax.tree.leaves(g_unrolled), jax.tree.leaves(outs[1][1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-3, atol=2e-6)
    # Layout conversion both ways, and HF export of the scanned tree equals the unrolled one's.
    moved, report = finetune.transplant(fams[1].init_params(jax.random.PRNGKey(5)), unrolled)
    assert not report["kept_init"]
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back, report = finetune.transplant(fams[0].init_params(jax.random.PRNGKey(5)), stacked)
    assert not report["kept_init"]
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(unrolled)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert hf_clip_weights.flat_params(stacked).keys() == hf_clip_weights.flat_params(unrolled).keys()


def test_prefetch_to_device_keeps_order_and_errors():
    from mmjax.parallel.mesh import prefetch_to_device

    calls = []
    put = lambda b: (calls.append(b), b * 10)[1]
    for size in (0, 1, 3):
        calls.clear()
        assert list(prefetch_to_device(iter(range(7)), put, size)) == [0, 10, 20, 30, 40, 50, 60]
        assert calls == list(range(7))

    def broken():
        yield 1
        yield 2
        raise RuntimeError("bad record")

    it = prefetch_to_device(broken(), put, 2)
    assert next(it) == 10 and next(it) == 20
    with pytest.raises(RuntimeError, match="bad record"):
        next(it)
    calls.clear()
    it = prefetch_to_device(iter(range(100)), put, 2)
    assert next(it) == 0
    it.close()  # the thread stops: one taken, two queued, at most one more in flight
    import time

    time.sleep(0.5)
    assert len(calls) <= 4


def test_bf16_params_train():
    """model.param_dtype=bfloat16: kernels stored in bf16 (so are their Adam moments),
    scalars like the logit scale stay float32, and the params stay bf16 through the
    update; on a fixed batch the loss falls as it does with float32 params."""
    from mmjax.parallel import mesh as mesh_lib

    curves = []
    for extra in (["model.param_dtype=bfloat16", "model.dtype=bfloat16"], ["model.dtype=bfloat16"]):
        c = config_lib.load(f"{ROOT}/configs/demo.py", TINY + extra + ["train.warmup_steps=0"])
        fam, opt, mesh, trainable, init, abstract, shard = bench._prepare(c)
        kernels = [x for x in jax.tree.leaves(abstract.params) if x.ndim >= 2]
        want = jnp.bfloat16 if "model.param_dtype=bfloat16" in extra else jnp.float32
        assert all(x.dtype == want for x in kernels)
        assert abstract.params["t"].dtype == jnp.float32
        state = jax.jit(init, out_shardings=shard)(jax.random.PRNGKey(0))
        fn = bench._compiled_step(c, fam, opt, mesh, trainable, shard)
        batch = mesh_lib.global_batch(mesh, bench.synthetic_batch(c, fam, 8))
        losses = []
        for _ in range(6):
            state, m = fn(state, batch)
            losses.append(float(m["loss"]))
        assert all(x.dtype == want for x in jax.tree.leaves(state.params) if x.ndim >= 2)
        curves.append(losses)
    bf16, f32 = curves
    assert np.all(np.isfinite(bf16)) and bf16[-1] < 0.8 * bf16[0]
    assert (bf16[0] - bf16[-1]) > 0.5 * (f32[0] - f32[-1])  # learns comparably
