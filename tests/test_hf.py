"""transformers CLIP <-> mmjax: feature parity, bit-exact round trips, workdirs, errors.

Every model is built from a random `CLIPConfig` (nothing is downloaded); skipped when
torch or transformers is not installed.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from mmjax import checkpoint as ckpt_lib  # noqa: E402
from mmjax import config as config_lib  # noqa: E402
from mmjax import workdir as workdir_lib  # noqa: E402
from mmjax.export import hf, hf_parity, hf_workdir  # noqa: E402
from mmjax.models import zoo  # noqa: E402
from mmjax.models.transformer import ACTIVATIONS  # noqa: E402
from mmjax.parallel import mesh as mesh_lib  # noqa: E402
from mmjax.train import optim  # noqa: E402
from mmjax.train import step as step_lib  # noqa: E402

TOL = 1e-4  # max|a - b| / max|b|, b = transformers (docs/benchmarks.md)
ARGMAX, EOS = "quickgelu-argmax", "gelu-eos"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{config name: (dir with save_pretrained output, the torch model)}, built lazily."""
    cache = {}

    def get(name):
        if name not in cache:
            d = str(tmp_path_factory.mktemp(name))
            model = hf_parity.random_hf_clip(hf_parity.PARITY_CONFIGS[name], seed=1)
            model.save_pretrained(d)
            cache[name] = (d, model)
        return cache[name]

    return get


def _state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _assert_same_state_dict(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert np.array_equal(a[k], b[k]), k


def _project(model, params, images_nchw, ids):
    """(project_image, project_text) of an mmjax CLIP, jitted; images NCHW -> NHWC."""
    img = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.project_image))(
        params, np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))
    )
    txt = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.project_text))(params, ids.astype(np.int32))
    return np.asarray(img), np.asarray(txt)


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", list(hf_parity.PARITY_CONFIGS))
def test_features_match_transformers(name, hf_dirs):
    cfg = hf_parity.PARITY_CONFIGS[name]
    src, hf_model = hf_dirs(name)
    images, ids = hf_parity.parity_inputs(cfg, batch=4, seed=2)
    ref_img, ref_txt = hf_parity.hf_features(hf_model, images, ids)
    model, variables = hf.load_clip(src)
    img, txt = hf_parity.mmjax_features(model, variables, images, ids)
    assert img.shape == ref_img.shape and txt.shape == ref_txt.shape
    assert hf_parity._rel(img, ref_img) <= TOL
    assert hf_parity._rel(txt, ref_txt) <= TOL
    # The settings that make it so, read from config.json.
    text = {**hf.TEXT_DEFAULTS, **cfg["text"]}
    assert model.act == hf.HF_TO_ACT[text["hidden_act"]]
    assert model.ln_eps == text["layer_norm_eps"]
    if text["eos_token_id"] == 2:
        assert (model.text_pool, model.eos_id) == ("argmax", None)
    else:
        assert (model.text_pool, model.eos_id) == ("eos", text["eos_token_id"])
    # mmjax's own CLIP methods still give the L2-normalised embedding (and aux).
    emb, aux = jax.jit(lambda v, x: model.apply(v, x, method=hf.CLIP.encode_image))(
        variables, np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    )
    np.testing.assert_allclose(np.asarray(emb), img / np.linalg.norm(img, axis=-1, keepdims=True), atol=1e-5)
    assert aux["tokens"].shape[0] == 4


def test_activations_match_transformers():
    from transformers.activations import ACT2FN

    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    tx = torch.from_numpy(x)
    for hf_name, act in hf.HF_TO_ACT.items():
        ref = ACT2FN[hf_name](tx).numpy()
        np.testing.assert_allclose(np.asarray(ACTIVATIONS[act](x)), ref, atol=2e-6, err_msg=hf_name)
    # ... and the three really differ (a wrong mapping would show).
    assert np.max(np.abs(ACTIVATIONS["gelu"](x) - ACTIVATIONS["gelu_tanh"](x))) > 1e-4


def test_exact_gelu_value_and_gradient_match_torch():
    """model.act 'gelu' is written as torch writes it (x/2 (1 + erf(x/sqrt 2)), cheaper
    on XLA's CPU than jax's erfc form); value and gradient equal torch's nn.GELU()."""
    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    tx = torch.from_numpy(x).requires_grad_()
    torch.nn.functional.gelu(tx).sum().backward()
    grad = jax.grad(lambda v: ACTIVATIONS["gelu"](v).sum())(jnp.asarray(x))
    np.testing.assert_allclose(
        np.asarray(ACTIVATIONS["gelu"](x)), torch.nn.functional.gelu(tx).detach().numpy(), atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(grad), tx.grad.numpy(), atol=2e-6)
    ref = jax.nn.gelu(jnp.asarray(x), approximate=False)
    np.testing.assert_allclose(np.asarray(ACTIVATIONS["gelu"](x)), np.asarray(ref), atol=1e-6)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", [ARGMAX, EOS])
def test_hf_to_mmjax_to_hf_is_identical(name, hf_dirs, tmp_path):
    src, hf_model = hf_dirs(name)
    model, variables = hf.load_clip(src)
    out = hf.save_clip(model, variables, str(tmp_path / "out"))
    back = transformers.CLIPModel.from_pretrained(out).eval()
    _assert_same_state_dict(_state_dict(hf_model), _state_dict(back))
    for tower in ("text_config", "vision_config"):
        a, b = getattr(hf_model.config, tower), getattr(back.config, tower)
        for key in (
            "hidden_act",
            "layer_norm_eps",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        ):
            assert getattr(a, key) == getattr(b, key), (tower, key)
    t0, t1 = hf_model.config.text_config, back.config.text_config
    assert (t0.bos_token_id, t0.eos_token_id, t0.pad_token_id) == (t1.bos_token_id, t1.eos_token_id, t1.pad_token_id)
    assert hf_model.config.projection_dim == back.config.projection_dim


def _random_clip(seed=0, **model):
    cfg = ml_collections.ConfigDict(
        dict(
            family="clip",
            image="mu/4",
            text="mu",
            embed_dim=24,
            image_overrides=dict(width=32, depth=2, heads=4, mlp_dim=48),
            text_overrides=dict(width=40, depth=1, heads=5, mlp_dim=80),
            vocab_size=61,
            image_size=16,
            text_len=9,
            **model,
        )
    )
    family = zoo.build(cfg)
    shapes = jax.eval_shape(family.init_params, jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)
    # Random everything (at init biases and LayerNorms would be 0 / 1).
    return family, jax.tree_util.tree_map(
        lambda s: (rng.normal(size=s.shape) / np.sqrt(s.shape[0] if s.ndim > 1 else 1)).astype(s.dtype), shapes
    )


def test_mmjax_to_hf_to_mmjax_is_bit_exact(tmp_path):
    family, params = _random_clip(act="quick_gelu", ln_eps=1e-5, text_pool="eos", eos_id=7)
    out = hf.save_clip(family.model, {"params": params}, str(tmp_path / "hf"))
    model, variables = hf.load_clip(out)
    a, b = _flat(params), _flat(variables["params"])
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k
    for attr in (
        "image",
        "text",
        "embed_dim",
        "vocab_size",
        "text_len",
        "act",
        "ln_eps",
        "text_pool",
        "eos_id",
        "pool",
        "posemb",
        "loss",
    ):
        assert getattr(model, attr) == getattr(family.model, attr), attr
    # transformers computes the same features from the exported directory.
    back = transformers.CLIPModel.from_pretrained(out).eval()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    ids = rng.integers(0, 61, size=(2, 9))
    ids[ids == 7] = 8
    ids[:, 5] = 7
    ref_img, ref_txt = hf_parity.hf_features(back, images, ids)
    img, txt = hf_parity.mmjax_features(model, variables, images, ids)
    assert hf_parity._rel(img, ref_img) <= TOL and hf_parity._rel(txt, ref_txt) <= TOL


def test_default_mmjax_clip_exports_with_first_eos(tmp_path):
    """mmjax's defaults (tanh gelu, eps 1e-6, last non-pad pooling) export as
    gelu_pytorch_tanh / 1e-6 / first eos at mmjax's eos id: equal on mmjax token rows."""
    family, params = _random_clip(seed=3)
    out = hf.save_clip(family, {"params": params}, str(tmp_path / "hf"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["text_config"]["hidden_act"] == "gelu_pytorch_tanh"
    assert config["text_config"]["layer_norm_eps"] == 1e-6
    assert (config["text_config"]["eos_token_id"], config["text_config"]["pad_token_id"]) == (3, 0)
    back = transformers.CLIPModel.from_pretrained(out).eval()
    rng = np.random.default_rng(1)
    images = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
    ids = np.zeros((3, 9), np.int64)  # bos w... eos pad...: the mmjax tokenizer's rows
    for b, n in enumerate((1, 4, 7)):
        ids[b, 0], ids[b, 1 : n + 1], ids[b, n + 1] = 2, rng.integers(6, 61, size=n), 3
    ref_img, ref_txt = hf_parity.hf_features(back, images, ids)
    img, txt = _project(family.model, params, images, ids)
    assert hf_parity._rel(img, ref_img) <= TOL and hf_parity._rel(txt, ref_txt) <= TOL


# ------------------------------------------------------------------ workdirs


def test_convert_to_workdir_restores_and_matches(hf_dirs, tmp_path):
    src, hf_model = hf_dirs(EOS)
    wd = str(tmp_path / "wd")
    config = hf_workdir.convert_to_workdir(src, wd)
    # The workdir's config is a valid mmjax recipe describing the imported model.
    saved = workdir_lib.load_config_json(wd)
    config_lib.validate(saved)
    assert saved.model.to_dict() == config.model.to_dict()
    m = saved.model
    assert (m.family, m.act, m.ln_eps, m.text_pool, m.eos_id) == ("clip", "gelu", 1e-5, "eos", 256)
    assert (m.image_size, m.text_len, m.vocab_size, m.embed_dim) == (30, 16, 257, 24)
    assert (saved.data.image_size, saved.data.text_len) == (30, 16)
    # A params-only step 0 (what finetune --init-from, eval and export read through the
    # workdir layer), restored onto state_plan's param shardings on another mesh.
    family = zoo.build(saved.model)
    optimizer = optim.make_optimizer(saved.train)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, abstract, shardings = step_lib.state_plan(family, optimizer, mesh, (1, 30, 30, 3), (1, 16))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
    state, meta = checkpointer.restore({"params": ckpt_lib.abstract_with_shardings(abstract.params, shardings.params)})
    checkpointer.close()
    assert checkpointer.restored_step == 0 and meta["data_position"] == 0 and meta["source"] == "hf-clip"
    assert meta["params_only"]
    cfg = hf_parity.PARITY_CONFIGS[EOS]
    images, ids = hf_parity.parity_inputs(cfg, batch=3, seed=4)
    ref_img, ref_txt = hf_parity.hf_features(hf_model, images, ids)
    params = jax.device_get(state["params"])
    img, txt = _project(family.model, params, images, ids)
    assert hf_parity._rel(img, ref_img) <= TOL and hf_parity._rel(txt, ref_txt) <= TOL
    # Params only: no optimizer state (a fine-tuning run makes its own), no EMA teacher for CLIP.
    manifest = ckpt_lib.read_manifest(os.path.join(wd, "checkpoints", "0"))
    assert manifest["shapes"] and all(k.startswith("['params']") for k in manifest["shapes"])
    # And out again: the same state dict transformers started from.
    out = hf_workdir.export_workdir(wd, str(tmp_path / "out"))
    back = transformers.CLIPModel.from_pretrained(out).eval()
    _assert_same_state_dict(_state_dict(hf_model), _state_dict(back))
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        hf_workdir.convert_to_workdir(src, wd)
    with pytest.raises(ValueError, match="no EMA teacher"):
        hf_workdir.export_workdir(wd, str(tmp_path / "ema"), weights="ema")
    # mmjax's own Setup (as `mmjax eval` builds one) takes it too: the workdir layer reads
    # the params onto its shardings (the imported vocabulary size is kept, not replaced
    # by the size of a tokenizer trained on the run's data).
    from mmjax.train import setup as setup_lib

    run = workdir_lib.load_config_json(wd)
    with run.unlocked():
        run.data.data_dir = str(tmp_path / "tfds")
        run.data.shapes.num_train, run.data.shapes.num_validation, run.data.shapes.num_test = 64, 8, 8
        run.data.shapes.image_size, run.data.tokenizer.vocab_size = 30, 40
    setup = setup_lib.Setup(run, wd)
    setup.checkpointer.close()
    restored, step = workdir_lib.read_params(wd, sharding=setup.state_sharding.params)
    assert step == 0
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_workdir_refuses_other_families(tmp_path):
    wd = tmp_path / "albef"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps({"model": {"family": "albef"}}))
    with pytest.raises(ValueError, match="CLIP-family workdir.*'albef'"):
        hf_workdir.export_workdir(str(wd), str(tmp_path / "out"))


# ------------------------------------------------------------------ what does not fit


def _edited_copy(src, dst, edit_config=None, edit_weights=None):
    from safetensors.numpy import save_file

    os.makedirs(dst)
    config = json.load(open(os.path.join(src, "config.json")))
    if edit_config:
        edit_config(config)
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    sd = hf.read_state_dict(src)
    if edit_weights:
        edit_weights(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_import_errors_name_the_mismatch(hf_dirs, tmp_path):
    src, _ = hf_dirs(ARGMAX)

    def siglip(c):
        c["model_type"] = "siglip"

    def patch(c):
        c["vision_config"]["patch_size"] = [4, 2]

    def acts(c):
        c["vision_config"]["hidden_act"] = "gelu"

    def proj(sd):
        sd["text_projection.weight"] = np.zeros((17, 32), np.float32)

    def extra(sd):
        sd["classifier.weight"] = np.zeros((2, 2), np.float32)

    cases = [
        (siglip, None, "model_type 'siglip'"),
        (patch, None, r"patch_size=\[4, 2\] is not square"),
        (acts, None, "hidden_act differs"),
        (None, proj, "projection dims differ"),
        (None, extra, "classifier.weight"),
    ]
    for i, (c, w, match) in enumerate(cases):
        d = _edited_copy(src, str(tmp_path / f"case{i}"), c, w)
        with pytest.raises(ValueError, match=match):
            hf.load_clip(d)


def test_export_errors_name_the_mismatch(tmp_path):
    cases = [
        (dict(pool="gap"), r"\[CLS\]"),
        (dict(loss="sigmoid"), "SigLIP"),
        (dict(posemb="sincos2d"), "learned position"),
        (dict(text_pool="eos", eos_id=2), "legacy argmax"),
    ]
    for i, (model, match) in enumerate(cases):
        family, params = _random_clip(**model)
        with pytest.raises(ValueError, match=match):
            hf.save_clip(family.model, {"params": params}, str(tmp_path / f"out{i}"))
    family, params = _random_clip()
    params = dict(params, image_proj={"kernel": np.zeros((32, 20), np.float32)})
    with pytest.raises(ValueError, match="projection dims differ"):
        hf.save_clip(family.model, {"params": params}, str(tmp_path / "proj"))


def test_convert_and_export_commands(hf_dirs, tmp_path, capsys):
    """`mmjax convert --from hf-clip` then `mmjax export --format hf-clip` give back the
    state dict transformers started from; an ALBEF-style request fails with code 2."""
    from mmjax import cli

    src, hf_model = hf_dirs(EOS)
    wd, out = str(tmp_path / "wd"), str(tmp_path / "out")
    assert cli.main(["convert", "--from", "hf-clip", "--src", src, "--workdir", wd]) == 0
    assert cli.main(["export", "--workdir", wd, "--format", "hf-clip", "--out", out]) == 0
    back = transformers.CLIPModel.from_pretrained(out).eval()
    _assert_same_state_dict(_state_dict(hf_model), _state_dict(back))
    assert cli.main(["export", "--workdir", wd, "--format", "hf-clip", "--out", out, "--weights", "ema"]) == 2
    assert "EMA" in capsys.readouterr().err


# ------------------------------------------------------------------ first contact (issue 14)


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    """(parent dir, 'wd'): a converted CLIP workdir with a sentencepiece tokenizer.model
    in it, as a trained workdir has."""
    from mmjax.data.tokenizer import train_tokenizer

    src, _ = hf_dirs(EOS)
    parent = tmp_path_factory.mktemp("first_contact")
    wd = str(parent / "wd")
    hf_workdir.convert_to_workdir(src, wd)
    colors, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
    train_tokenizer(
        [f"a {c} {s} left of a {d} {t}" for c in colors for s in shapes for d in colors for t in shapes], wd, 40
    )
    return parent, "wd"


def test_export_command_with_a_relative_workdir(converted, hf_dirs, monkeypatch, capsys):
    """`mmjax export --format hf-clip --workdir workdirs/demo` (relative, as the docs
    write it) crashed in read_workdir_params: orbax reads no metadata from a relative path."""
    from mmjax import cli

    parent, wd = converted
    monkeypatch.chdir(parent)
    assert cli.main(["export", "--workdir", wd, "--format", "hf-clip", "--out", "rel_out"]) == 0, (
        capsys.readouterr().err
    )
    transformers.CLIPModel.from_pretrained(str(parent / "rel_out"))
    params = hf_workdir.read_workdir_params(wd)[1]  # the function itself, relative
    assert jax.tree.leaves(params)
    # Converting into it again: one line (FileExistsError), not a traceback.
    capsys.readouterr()
    assert cli.main(["convert", "--from", "hf-clip", "--src", hf_dirs(EOS)[0], "--workdir", wd]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "Traceback" not in err


def test_hf_export_has_preprocessor_card_and_tokenizer(converted, tmp_path):
    """Besides config.json + model.safetensors: preprocessor_config.json that
    CLIPImageProcessor loads with the run's size and mmjax's mean/std (and prepares an
    image as mmjax's eval pipeline does), the sentencepiece tokenizer.model, and a README
    model card whose code runs."""
    from PIL import Image

    from mmjax.data import pipeline

    parent, wd = converted
    wd = str(parent / wd)
    out = hf_workdir.export_workdir(wd, str(tmp_path / "out"))
    assert sorted(os.listdir(out)) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.model",
    ]
    config = workdir_lib.load_config_json(wd)
    size = int(config.data.image_size)
    proc = transformers.CLIPImageProcessor.from_pretrained(out)
    assert (proc.size["height"], proc.size["width"]) == (size, size) and not proc.do_center_crop
    np.testing.assert_allclose(proc.image_mean, pipeline.MEAN)
    np.testing.assert_allclose(proc.image_std, pipeline.STD)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    got = proc(images=x, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(got, (x / 255.0 - np.asarray(pipeline.MEAN)) / np.asarray(pipeline.STD), atol=1e-5)
    # A larger image: the processor's resize (PIL) against mmjax's eval preprocessing (TF).
    smooth = np.linspace(0, 1, 90)[None, :, None] * np.linspace(0, 1, 70)[:, None, None] * np.array([255, 128, 60])
    big = str(tmp_path / "big.png")
    Image.fromarray((smooth + rng.normal(0, 20, smooth.shape)).clip(0, 255).astype(np.uint8)).save(big)
    try:
        import tensorflow  # noqa: F401  mmjax's eval preprocessing (the `data` extra)
    except ImportError:
        pass
    else:
        from mmjax.data import images as images_lib

        want, _ = images_lib.load_images(config.data, [big])
        got = proc(images=Image.open(big), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        assert np.abs(got - want[0]).max() < 0.05  # ~1/255 of the pixel range: PIL vs TF resize
    # The run's tokenizer, byte for byte; the card says how to use it, and its code runs.
    assert (
        open(os.path.join(out, "tokenizer.model"), "rb").read()
        == open(os.path.join(wd, "tokenizer.model"), "rb").read()
    )
    card = open(os.path.join(out, "README.md")).read()
    for needle in (
        "library_name: transformers",
        "| family | CLIP",
        "step 0",
        "mmjax export --format hf-clip",
        "CLIPImageProcessor",
        "sentencepiece",
        "not a `CLIPTokenizer`",
        f"{size}x{size}",
        '"train_split"',
    ):
        assert needle in card, needle
    Image.fromarray(x).save(os.path.join(out, "cat.png"))
    blocks = [b.split("```", 1)[0] for b in card.split("```python\n")[1:]]
    assert len(blocks) == 2
    cwd = os.getcwd()
    try:
        os.chdir(out)
        scope = {}
        for block in blocks:
            exec(block.replace('"OUT"', '"."'), scope)
    finally:
        os.chdir(cwd)
    assert tuple(scope["image_features"].shape) == (1, config.model.embed_dim)
    assert tuple(scope["text_features"].shape) == (1, config.model.embed_dim)
    ids = scope["ids"].numpy()[0]
    from mmjax.data.tokenizer import Tokenizer

    np.testing.assert_array_equal(
        ids,
        Tokenizer(os.path.join(wd, "tokenizer.model")).encode(
            ["a red circle left of a blue square"], int(config.data.text_len)
        )[0],
    )
