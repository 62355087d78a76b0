"""Fine-tuning from a pretraining checkpoint: what is restored, position-embedding
resizing, frozen params, layer-wise lr decay, and `mmjax finetune` end to end."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax import cli
from mmjax import config as config_lib
from mmjax.models import zoo
from mmjax.train import finetune, loop, optim
from mmjax.train import setup as setup_lib
from mmjax.train import step as step_lib
from tiny import ROOT, tiny_config, tiny_overrides, write_images

FT = f"{ROOT}/configs/finetune_shapes.py"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny CLIP pretraining workdir (8 steps)."""
    d = tmp_path_factory.mktemp("ft")
    work = d / "pre"
    loop.train(tiny_config(d, **{"train.steps": 8, "eval.at_end": False}), str(work), progress=False)
    return d, work


def _classifier(backbone_model, image_size=16, num_classes=24):
    cfg = ml_collections.ConfigDict(
        {
            "family": "classifier",
            "backbone": backbone_model.to_dict(),
            "num_classes": num_classes,
            "image_size": image_size,
        }
    )
    return zoo.build(cfg)


def test_restores_only_the_image_path_and_keeps_features(pretrained):
    """Same image size: the classifier's backbone params are the checkpoint's arrays
    (position table untouched), its feature is CLIP's image embedding, and the text
    tower is left behind."""
    _, work = pretrained
    model_cfg, pre = finetune.pretrained_params(str(work))
    fam = _classifier(model_cfg)
    init = fam.init_params(jax.random.PRNGKey(1), (1, 16, 16, 3))
    params, report = finetune.transplant(init, pre, "backbone/")
    assert report["resized"] == [] and report["kept_init"] == ["head/bias", "head/kernel"]
    assert "text_tower" not in params["backbone"] and report["unused"] > 0
    for path, v in jax.tree_util.tree_flatten_with_path(params["backbone"])[0]:
        src = pre
        for k in path:
            src = src[k.key]
        np.testing.assert_array_equal(np.asarray(v), src)
    clip = zoo.build(ml_collections.ConfigDict(model_cfg.to_dict()))
    image = jax.random.normal(jax.random.PRNGKey(2), (3, 16, 16, 3))
    want = clip.encode_image(pre, image)
    got = fam.model.apply({"params": params}, image, method=lambda m, x: m.backbone.encode_image(x)[0])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_position_embedding_resized_for_a_new_image_size(pretrained):
    _, work = pretrained
    model_cfg, pre = finetune.pretrained_params(str(work))
    fam = _classifier(model_cfg, image_size=32)  # patch 4: 4x4 -> 8x8 grid
    init = fam.init_params(jax.random.PRNGKey(1), (1, 32, 32, 3))
    params, report = finetune.transplant(init, pre, "backbone/")
    assert report["resized"] == ["backbone/image_tower/pos_embedding"]
    old = pre["image_tower"]["pos_embedding"]
    new = np.asarray(params["backbone"]["image_tower"]["pos_embedding"])
    cls = old.shape[1] - 16  # 1 with a [CLS] token, 0 for mean pooling (the tiny recipe)
    assert new.shape == (1, cls + 64, old.shape[2])
    np.testing.assert_array_equal(new[:, :cls], old[:, :cls])  # a [CLS] position is kept
    with_cls = np.concatenate([np.full((1, 1, 4), 7.0, np.float32), np.ones((1, 16, 4), np.float32)], axis=1)
    resized = finetune.interpolate_posemb(with_cls, 1 + 64)
    assert resized.shape == (1, 65, 4) and np.all(resized[:, 0] == 7.0)
    # A constant grid stays constant; an unchanged length is returned as is.
    const = np.ones((1, 1 + 16, 5), np.float32)
    np.testing.assert_allclose(finetune.interpolate_posemb(const, 1 + 64), 1.0, atol=1e-5)
    assert finetune.interpolate_posemb(old, old.shape[1]) is old
    with pytest.raises(ValueError, match="square"):
        finetune.interpolate_posemb(np.zeros((1, 1 + 12, 4)), 1 + 16)


def test_frozen_backbone_is_bit_identical_and_head_moves(pretrained):
    """Linear probe: 3 steps change the head and leave every backbone array as it was."""
    _, work = pretrained
    model_cfg, pre = finetune.pretrained_params(str(work))
    fam = _classifier(model_cfg)
    tc = ml_collections.ConfigDict({"steps": 3, "warmup_steps": 0, "lr": 1e-2, "weight_decay": 0.1, "grad_clip": 1.0})
    opt = optim.make_optimizer(tc)
    state = step_lib.init_state(fam, opt, jax.random.PRNGKey(0), (1, 16, 16, 3), (1, 16))
    params, _ = finetune.transplant(state.params, pre, "backbone/")
    state = state.replace(params=params, opt_state=opt.init(params))
    trainable = optim.trainable_mask(params, ("^backbone/",))
    fn = jax.jit(step_lib.make_train_step(fam, opt, trainable=trainable))
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {
            "image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
            "label": rng.integers(0, 24, size=8).astype(np.int32),
        }
        state, m = fn(state, batch)
    assert np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(state.params["backbone"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(params["head"]["kernel"]), np.asarray(state.params["head"]["kernel"]))


def test_layer_decay_scales_updates_by_depth():
    params = {
        "image_tower": {
            "patch_embed": {"conv": {"kernel": jnp.ones((2,))}},
            "encoder": {
                "block00": {"w": jnp.ones((2,))},
                "block01": {"w": jnp.ones((2,))},
                "ln_final": {"scale": jnp.ones((2,))},
            },
        },
        "head": {"kernel": jnp.ones((2,))},
    }
    ids, n = optim.layer_ids(params)
    assert n == 2 and ids["image_tower/patch_embed/conv/kernel"] == 0
    assert ids["image_tower/encoder/block01/w"] == 2 and ids["head/kernel"] == 3
    out, _ = optim.scale_by_layer(0.5).update(params, optax.EmptyState())
    assert float(out["head"]["kernel"][0]) == 1.0
    assert float(out["image_tower"]["encoder"]["block01"]["w"][0]) == 0.5
    assert float(out["image_tower"]["encoder"]["block00"]["w"][0]) == 0.25
    assert float(out["image_tower"]["patch_embed"]["conv"]["kernel"][0]) == 0.125


def test_finetune_command(pretrained, tmp_path, capsys):
    d, work = pretrained
    over = {k: v for k, v in tiny_overrides(d).items() if not k.startswith("model.")}
    over.update({"train.steps": 4, "train.log_every": 2, "train.ckpt_every": 0})
    flags = [f"--config.{k}={v}" for k, v in over.items()]
    rc = cli.main(
        [
            "finetune",
            "--config",
            FT + ":full",
            "--init-from",
            str(work),
            "--workdir",
            str(tmp_path / "ft"),
            "--no-progress",
            *flags,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert '"top1"' in out and '"num_classes": 24' in out
    # An EMA teacher only exists for ALBEF-style runs: a clear error, exit code 2.
    rc = cli.main(
        [
            "finetune",
            "--config",
            FT + ":linear",
            "--init-from",
            str(work),
            "--weights",
            "ema",
            "--workdir",
            str(tmp_path / "ft2"),
            "--no-progress",
            *flags,
        ]
    )
    assert rc == 2 and "no EMA teacher" in capsys.readouterr().err
    with pytest.raises(config_lib.ConfigError, match="valid choices"):
        config_lib.load(FT + ":linear", ["finetune.weights=teacher"])
    # Retrieval fine-tuning continues the pretraining objective from the checkpoint.
    tiny = {k: v for k, v in tiny_overrides(d).items()}
    tiny.update({"train.steps": 2, "train.log_every": 1, "train.ckpt_every": 0, "train.batch_size": 16})
    rc = cli.main(
        [
            "finetune",
            "--config",
            f"{ROOT}/configs/finetune_retrieval.py:clip",
            "--init-from",
            str(work),
            "--workdir",
            str(tmp_path / "ret"),
            "--no-progress",
            *[f"--config.{k}={v}" for k, v in tiny.items()],
        ]
    )
    assert rc == 0 and '"i2t_r@1"' in capsys.readouterr().out
    assert config_lib.load(f"{ROOT}/configs/finetune_retrieval.py:albef").model.tasks == ("itc", "itm")


def test_embed_command(pretrained, tmp_path, capsys):
    """`mmjax embed` gives the model's own embeddings of files and texts; a broken file
    is skipped and listed."""
    _, work = pretrained
    paths, bad = write_images(tmp_path, 3)
    texts = tmp_path / "t.txt"
    texts.write_text("a red circle left of a blue square\n\na small green cross\n")
    out = tmp_path / "e.npz"
    rc = cli.main(
        ["embed", "--workdir", str(work), "--images", *paths, str(bad), "--texts", str(texts), "--out", str(out)]
    )
    assert rc == 0, capsys.readouterr().err
    z = np.load(out)
    assert z["image_emb"].shape[0] == 3 and list(z["skipped"]) == [str(bad)]
    assert z["text_emb"].shape[0] == 2 and list(z["texts"])[1] == "a small green cross"
    np.testing.assert_allclose(np.linalg.norm(z["image_emb"], axis=-1), 1.0, atol=1e-4)
    # The same vectors as the model applied to the same prepared pixels and tokens.
    from mmjax import workdir as workdir_lib
    from mmjax.data import images as images_lib

    config = workdir_lib.load_config_json(str(work))
    setup = setup_lib.Setup(config, str(work))
    state, _ = setup.restore()
    setup.checkpointer.close()
    pixels, _ = images_lib.load_images(config.data, paths)
    want = setup.family.encode_image(state.params, pixels)
    np.testing.assert_allclose(z["image_emb"], np.asarray(want), atol=1e-5)
    ids = setup.tokenizer.encode(["a small green cross"], int(config.data.text_len))
    np.testing.assert_allclose(z["text_emb"][1], np.asarray(setup.family.encode_text(state.params, ids))[0], atol=1e-5)


def test_albef_init_from_ema_teacher(tmp_path):
    """`--weights ema`: the new run's params (and its fresh teacher) start as the source's
    EMA teacher, not its student; queues start empty."""
    import ml_collections as mlc

    from tiny import albef_config

    src = tmp_path / "src"
    loop.train(
        albef_config(tmp_path, **{"train.steps": 4, "train.ckpt_every": 0, "eval.at_end": False}),
        str(src),
        progress=False,
    )
    _, ema = finetune.pretrained_params(str(src), "ema")
    _, student = finetune.pretrained_params(str(src), "student")
    cfg = albef_config(tmp_path, **{"train.steps": 4})
    with cfg.unlocked():
        cfg.finetune = mlc.ConfigDict({"init_from": str(src), "weights": "ema"})
    setup = setup_lib.Setup(cfg, str(tmp_path / "ft"))
    state = setup.fresh_state()
    setup.checkpointer.close()
    got = jax.tree.leaves(state.params)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(student)))
    for a, b, c in zip(got, jax.tree.leaves(ema), jax.tree.leaves(state.ema_params)):
        np.testing.assert_array_equal(np.asarray(a), b)
        np.testing.assert_array_equal(np.asarray(c), b)
    assert int(np.max(np.asarray(state.queues["ids"]))) == -1


@pytest.mark.parametrize("inflation", ["central", "mean"])
def test_an_image_checkpoint_starts_a_video_model(pretrained, inflation):
    """`mmjax finetune` from the tiny image CLIP into a tubelet video CLIP: every image
    param is the checkpoint's array, the patch kernel is inflated as
    `finetune.inflation` says, the temporal parts start fresh (as the identity), and a
    still clip embeds like its frame under the checkpoint's image model."""
    from mmjax.models.video import inflate_patch_kernel

    d, work = pretrained
    over = {k: v for k, v in tiny_overrides(d).items()}
    over.update(
        {
            "data.name": "moving_shapes",
            "data.num_frames": 4,
            "model.tubelet": 2,
            "model.temporal": "divided",
            "finetune.inflation": inflation,
            "data.moving_shapes": "{'image_size': 16, 'num_frames': 8, 'num_train': 16, 'num_validation': 4, "
            "'num_test': 4, 'seed': 0}",
        }
    )
    cfg = config_lib.load(f"{ROOT}/configs/video_clip.py", [f"{k}={v}" for k, v in over.items()])
    with cfg.unlocked():
        cfg.finetune.init_from = str(work)
    setup = setup_lib.Setup(cfg, str(d / f"video_{inflation}"))
    params = jax.device_get(setup.fresh_state().params)
    _, pre = finetune.pretrained_params(str(work))
    kernel = params["image_tower"]["patch_embed"]["conv"]["kernel"]
    np.testing.assert_array_equal(
        kernel, inflate_patch_kernel(pre["image_tower"]["patch_embed"]["conv"]["kernel"], 2, inflation)
    )
    flat = {finetune.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, v in jax.tree_util.tree_flatten_with_path(pre)[0]:
        key = finetune.path_str(path)
        if key != "image_tower/patch_embed/conv/kernel" and not key.endswith("pos_embedding"):
            np.testing.assert_array_equal(flat[key], v, err_msg=key)
    new = [k for k in flat if "time" in k or "temporal" in k]
    assert new and all(not np.any(flat[k]) for k in new if k.endswith(("time_proj/kernel", "temporal_embedding")))
    image_fam = zoo.build(finetune.pretrained_params(str(work))[0])
    frame = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 3))
    want = image_fam.encode_image(pre, frame)
    got = setup.family.encode_image(params, jnp.repeat(frame[:, None], 4, axis=1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
