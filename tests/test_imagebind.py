"""ImageBind and Meta-Transformer at tiny shapes, model level: the InfoNCE objective
against numpy, no gradient into the frozen CLIP, the text anchor, learned temperatures,
the bind metrics against brute force, and a step on 8 devices (pmap and a sharded
mesh) equal to one device's. The recipes end to end (frozen towers bit-identical,
exact resume, the eval) are in tests/test_bind_e2e.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.special

from mmjax.errors import ConfigError
from mmjax.eval import bind
from mmjax.models import zoo

SR, SAMPLES = 8000, 2048
TOWER = dict(width=32, depth=1, heads=2, mlp_dim=64)


def _imagebind(**extra):
    mc = dict(
        family="imagebind", image="mu/4", text="mu", image_overrides=TOWER, text_overrides=TOWER, embed_dim=16,
        vocab_size=40, image_size=16, text_len=16, modalities=("audio", "depth"),
        audio=dict(variant="mu/8", overrides=TOWER, n_fft=128, hop=64, n_mels=16, mean=-6.0, std=4.0),
        depth=dict(variant="mu/4", overrides=TOWER), audio_sample_rate=SR, audio_samples=SAMPLES, audio_channels=2,
    )  # fmt: skip
    mc.update(extra)
    return zoo.build(mc)


def _meta(**extra):
    mc = dict(
        family="meta_transformer", image="mu/4", image_overrides=TOWER, image_size=16, num_classes=5,
        modalities=("audio", "depth"), audio=dict(patch=8, n_fft=128, hop=64, n_mels=16), depth=dict(patch=4),
        audio_sample_rate=SR, audio_samples=SAMPLES, audio_channels=2,
    )  # fmt: skip
    mc.update(extra)
    return zoo.build(mc)


def _batch(n=8, seed=0, text=False):
    rng = np.random.default_rng(seed)
    out = {
        "image": rng.normal(size=(n, 16, 16, 3)).astype(np.float32),
        "audio": (0.1 * rng.normal(size=(n, SAMPLES, 2))).astype(np.float32),
        "audio_len": rng.integers(SAMPLES // 2, SAMPLES + 1, size=n).astype(np.int32),
        "depth": rng.normal(size=(n, 16, 16, 1)).astype(np.float32),
        "label": rng.integers(0, 5, size=n).astype(np.int32),
        "id": np.arange(n),
    }
    if text:
        ids = rng.integers(6, 40, size=(n, 16)).astype(np.int32)
        ids[:, 0], ids[:, 6], ids[:, 7:] = 2, 3, 0
        out["text"] = ids
    return out


def _infonce(a, x, scale):
    logits = scale * a @ x.T
    n = np.arange(len(a))
    ce = lambda lg: -(scipy.special.log_softmax(lg, axis=1)[n, n]).mean()
    return (ce(logits) + ce(logits.T)) / 2


@pytest.mark.parametrize("anchor", ["image", "text"])
def test_objective_is_infonce_per_modality_against_the_anchor(anchor):
    fam = _imagebind(anchor=anchor)
    params = fam.init_params(jax.random.PRNGKey(0))
    b = _batch(text=True)
    loss, metrics, _ = jax.jit(fam.objective)(params, {k: b[k] for k in fam.batch_keys if k in b})
    a = fam.encode_image(params, b["image"]) if anchor == "image" else fam.encode_text(params, b["text"])
    a = np.asarray(a)
    want = []
    for m, scale in (("audio", 20.0), ("depth", 5.0)):
        x = np.asarray(fam.encode_modality(params, m, b[m], b.get(f"{m}_len")))
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
        want.append(_infonce(a, x, scale))
        np.testing.assert_allclose(metrics[f"{m}_loss"], want[-1], rtol=2e-5)
        assert float(metrics[f"{m}_logit_scale"]) == pytest.approx(scale)
    np.testing.assert_allclose(loss, np.mean(want), rtol=2e-5)
    assert ("text" in fam.batch_keys) == (anchor == "text") and ("image" in fam.batch_keys) == (anchor == "image")


def test_no_gradient_reaches_the_clip_and_every_tower_leaf_gets_one():
    fam = _imagebind()
    params = fam.init_params(jax.random.PRNGKey(0))
    b = _batch()
    grads = jax.grad(lambda p: fam.objective(p, {k: b[k] for k in fam.batch_keys if k in b})[0])(params)
    for part in ("image_tower", "text_tower", "image_proj", "text_proj", "t"):
        assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[part])), part
    for part in ("audio_tower", "depth_tower"):
        for path, g in jax.tree_util.tree_leaves_with_path(grads[part]):
            if "positions" in jax.tree_util.keystr(path) and "cls" in jax.tree_util.keystr(path):
                continue  # zero-init [CLS]: its gradient is generic, checked via pos_embedding
            assert float(jnp.abs(g).max()) > 0, (part, jax.tree_util.keystr(path))


def test_learned_temperature_starts_at_the_release_scale_and_is_clamped():
    fam = _imagebind(temperature="learned", logit_scale=dict(audio=20.0, depth=5.0))
    params = fam.init_params(jax.random.PRNGKey(0))
    assert float(params["audio_tower"]["t"]) == pytest.approx(np.log(20.0))
    assert float(params["depth_tower"]["t"]) == pytest.approx(np.log(5.0))
    params["audio_tower"]["t"] = jnp.float32(9.0)  # past ln 100
    _, metrics, _ = fam.objective(params, {k: v for k, v in _batch().items() if k in fam.batch_keys})
    assert float(metrics["audio_logit_scale"]) == pytest.approx(100.0, rel=1e-5)
    grads = jax.grad(lambda p: fam.objective(p, {k: v for k, v in _batch().items() if k in fam.batch_keys})[0])(
        fam.init_params(jax.random.PRNGKey(0))
    )
    assert float(grads["depth_tower"]["t"]) != 0.0


def test_bad_keys_are_config_errors():
    with pytest.raises(ConfigError, match="model.modalities"):
        _imagebind(modalities=("audio", "smell"))
    with pytest.raises(ConfigError, match="model.audio.patch"):
        _imagebind(audio=dict(patch=8))
    with pytest.raises(ConfigError, match="num_classes"):
        _meta(num_classes=1)
    with pytest.raises(ConfigError, match="model.depth.n_mels"):
        _meta(depth=dict(n_mels=3))


def test_meta_transformer_shares_one_encoder_or_keeps_one_each():
    shared = _meta().init_params(jax.random.PRNGKey(0))
    separate = _meta(encoder="separate").init_params(jax.random.PRNGKey(0))
    assert "encoder" in shared and not any(k.startswith("encoder_") for k in shared)
    assert {"encoder_audio", "encoder_depth"} <= set(separate) and "encoder" not in separate
    fam = _meta()
    b = _batch()
    loss, metrics, _ = fam.objective(shared, {k: b[k] for k in fam.batch_keys if k in b})
    want = []
    for m in ("audio", "depth"):
        lg = np.asarray(fam.logits(shared, b[m], b.get(f"{m}_len"), modality=m))
        want.append(-scipy.special.log_softmax(lg, axis=1)[np.arange(8), b["label"]].mean())
        np.testing.assert_allclose(metrics[f"{m}_loss"], want[-1], rtol=2e-5)
    np.testing.assert_allclose(loss, np.mean(want), rtol=2e-5)


def test_bind_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    img = norm(rng.normal(size=(12, 6)))
    x = norm(img + 0.8 * rng.normal(size=(12, 6)))
    caps = [f"c{i % 9}" for i in range(12)]  # rows 9-11 repeat captions 0-2
    txt = norm(rng.normal(size=(12, 6)))
    txt[9:] = txt[:3]
    out = bind.bind_metrics(
        {"audio": x}, img, txt, caps, labels=np.arange(12) % 3, class_txt=norm(rng.normal(size=(3, 6)))
    )
    r1 = np.mean([np.argmax(x[i] @ img.T) == i for i in range(12)])
    assert out["audio2i_r@1"] == pytest.approx(r1) and out["audio2i_chance@1"] == pytest.approx(1 / 12)
    uniq = sorted(set(caps))
    first = [caps.index(u) for u in uniq]
    t_r5 = np.mean([uniq.index(caps[i]) in np.argsort(-(x[i] @ txt[first].T))[:5] for i in range(12)])
    assert out["audio2t_r@5"] == pytest.approx(t_r5) and out["audio2t_chance@1"] == pytest.approx(1 / 9)
    j = (np.arange(12) + 6) % 12
    q = norm(img + x[j])
    hits = [{i, j[i]} <= set(np.argsort(-(q[i] @ img.T))[:5].tolist()) for i in range(12)]
    assert out["audio_arith_hit@5"] == pytest.approx(np.mean(hits))
    assert 0.0 <= out["audio_zero_shot_top1"] <= 1.0 and out["audio_zero_shot_chance"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("which,mode,mesh", [("imagebind", "pmap", None), ("meta_transformer", "mesh", {"data": 8})])
def test_step_on_eight_devices_equals_one_device(which, mode, mesh):
    """Two steps under pmap (ImageBind: InfoNCE over the gathered global batch) and on an
    8-way data mesh (Meta-Transformer: per-example losses averaged) equal one device's."""
    from test_parallel import run

    fam = _imagebind() if which == "imagebind" else _meta()
    train = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=1, steps=4, weight_decay=0.05, grad_clip=1.0))
    batches = [{k: v for k, v in _batch(seed=s).items() if k in fam.batch_keys} for s in range(2)]
    ref_loss, ref, _ = run(fam, train, batches, "mesh", {"data": 1}, jax.devices()[:1])
    loss, state, _ = run(fam, train, batches, mode, mesh)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    for (path, v), got in zip(jax.tree_util.tree_leaves_with_path(ref.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(got, v, rtol=1e-4, atol=2e-6, err_msg=f"{mode} {jax.tree_util.keystr(path)}")


def test_evaluator_refuses_batches_without_images_before_any_step():
    from mmjax.eval.run import Evaluator

    data = ml_collections.ConfigDict(dict(name="shapes_av", modalities=("text", "audio", "depth")))
    with pytest.raises(ValueError, match="add 'image'"):
        Evaluator(_imagebind(), data, None, None, split="test", batch_size=8)
