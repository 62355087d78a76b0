"""The public Python API: `mmjax.load(workdir)` on a tiny CLIP trained for 2 steps.
Its embeddings are the family's own encoders on the same pixels and ids, its
zero-shot argmax is numpy's from those embeddings, and `import mmjax` stays cheap."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import mmjax
from mmjax import workdir as workdir_lib
from mmjax.data import images as images_lib
from mmjax.train import loop
from tiny import ROOT, tiny_config, write_images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    work = str(d / "wd")
    loop.train(tiny_config(d, **{"train.steps": 2, "eval.at_end": False}), work, progress=False)
    return work


@pytest.fixture(scope="module")
def model(trained):
    return mmjax.load(trained, weights="student")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """(uint8 images [5, 20, 24, 3], the same pixels as PNG files)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("pictures")
    arr = np.random.default_rng(0).integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)
    paths = [str(d / f"p{i}.png") for i in range(len(arr))]
    for a, p in zip(arr, paths):
        Image.fromarray(a).save(p)
    return arr, paths


def test_import_is_cheap_and_has_a_version():
    """`import mmjax` imports neither jax nor TensorFlow; `mmjax.load` appears on use."""
    code = (
        "import sys, mmjax\n"
        "heavy = sorted(m for m in ('jax', 'flax', 'orbax', 'tensorflow', 'mmjax.api') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print(mmjax.__version__)\n"
        "assert callable(mmjax.load) and 'mmjax.api' in sys.modules and 'load' in dir(mmjax)\n"
        "try:\n    mmjax.nope\nexcept AttributeError as e:\n    print(e)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True, timeout=300)
    version, err = out.stdout.splitlines()
    assert version == mmjax.__version__ and version.count(".") >= 1
    assert "has no attribute 'nope'" in err


def test_load_gives_the_workdir(model, trained):
    opened = workdir_lib.open_workdir(trained)
    assert model.step == opened.step == 2 and model.weights == "student"
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(opened.params)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert model.config.model.family == "clip" and model.model is model.family.model
    assert model.tokenizer.model_path == os.path.join(trained, "tokenizer.model")
    assert (model.image_size, model.text_len) == (16, 16)
    assert "clip" in repr(model)
    with pytest.raises(ValueError, match="no EMA teacher"):
        mmjax.load(trained, weights="ema")
    with pytest.raises(ValueError, match="valid choices: student, ema"):
        mmjax.load(trained, weights="teacher")


def test_preprocess_is_the_eval_pipeline(model, pictures, tmp_path):
    """uint8 arrays and image files give the pixels `mmjax embed` prepares."""
    arr, paths = pictures
    want, ok = images_lib.load_images(model.config.data, paths)
    assert ok == paths and want.shape == (5, 16, 16, 3)
    got = model.preprocess(arr)
    assert got.dtype == np.float32 and got.shape == (5, 16, 16, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(model.preprocess(paths), want)
    np.testing.assert_allclose(model.preprocess(arr[0]), want[:1], rtol=0, atol=1e-6)
    _, bad = write_images(tmp_path, 1)
    with pytest.raises(ValueError, match="bad.png"):
        model.preprocess([paths[0], bad])
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        model.preprocess(arr[..., :2])


def test_encoders_equal_the_family(model, pictures):
    """Batched through the API (3 rows at a time) or all at once through the family."""
    arr, _ = pictures
    pixels = model.preprocess(arr)
    model.batch_size = 3
    img = model.encode_image(arr)
    want = np.asarray(model.family.encode_image(model.params, pixels))
    assert img.shape == want.shape and img.dtype == np.float32
    np.testing.assert_allclose(img, want, atol=1e-5)
    np.testing.assert_allclose(model.encode_image(pixels), img, atol=1e-6)  # prepared pixels pass as they are
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    texts = ["a small red circle left of a large blue square", "a green triangle", "a large yellow square"]
    txt = model.encode_text(texts)
    ids = model.tokenizer.encode(texts, model.text_len)
    np.testing.assert_allclose(txt, np.asarray(model.family.encode_text(model.params, ids)), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(model.encode_text(texts[0]), txt[:1], atol=1e-6)


def test_zero_shot_is_the_template_mean_rule(model, pictures):
    arr, _ = pictures
    names, templates = ["red circle", "blue square", "red square"], ["{}", "a {}"]
    probs = model.zero_shot(arr, names, templates)
    assert probs.shape == (5, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    img = model.encode_image(arr)
    per_template = [model.encode_text([t.format(n) for n in names]) for t in templates]
    mean = np.mean(per_template, axis=0)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    sims = img @ mean.T
    np.testing.assert_array_equal(np.argmax(probs, axis=1), np.argmax(sims, axis=1))
    logits = 100.0 * sims
    want = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, want / want.sum(axis=1, keepdims=True), atol=1e-4)
    # the dataset's built-in templates by default; a bad template is one clear error
    builtin = model.zero_shot(arr, ["red", "blue"], ("a small {}", "a large {}"))
    np.testing.assert_array_equal(model.zero_shot(arr, ["red", "blue"]), builtin)
    assert not np.array_equal(model.zero_shot(arr, ["red", "blue"], ["{}"]), builtin)
    with pytest.raises(ValueError, match="exactly one"):
        model.zero_shot(arr, names, ["no placeholder"])


def test_the_documented_example_runs(trained, capsys):
    """docs/usage.md's Python API example, on the tiny workdir."""
    text = open(os.path.join(ROOT, "docs", "usage.md")).read()
    section = text[text.index("## Python API") :]
    code = section[
        section.index("```python\n") + len("```python\n") : section.index("```\n", section.index("```python"))
    ]
    assert "mmjax.load(" in code and "zero_shot(" in code
    exec(compile(code.replace('"workdirs/demo"', repr(trained)), "usage.md", "exec"), {})
    out = capsys.readouterr().out.split("\n")
    assert out[0].startswith("[[") and out[-2].startswith("[")


def test_a_family_without_encoders_says_so(model):
    """A classifier workdir loads, but has no embeddings to give: one clear error."""
    import ml_collections

    config = ml_collections.ConfigDict(model.config.to_dict())
    with config.unlocked():
        config.model = ml_collections.ConfigDict(
            {"family": "classifier", "backbone": model.config.model.to_dict(), "num_classes": 3, "image_size": 16}
        )
    clf = mmjax.Model(workdir_lib.Workdir(model.workdir.path, config, {}, 0, "student"))
    with pytest.raises(ValueError, match=r"'classifier' has no image/text encoders .*clip"):
        clf.encode_text(["a red circle"])
