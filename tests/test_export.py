"""Export of a workdir: safetensors (bit-exact round trip in fp32 and bf16, clear
errors on a file that does not fit its model), StableHLO encoders served without
flax that match the live model on new batch sizes, and student vs EMA weights."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as stn

from mmjax import workdir as workdir_lib
from mmjax.data.tokenizer import Tokenizer
from mmjax.export import formats, serving
from mmjax.models import zoo
from mmjax.parallel.sharding import path_str
from mmjax.train import loop
from mmjax.train import setup as setup_lib
from tiny import ROOT, albef_config, tiny_config

STEPS = {"train.steps": 3, "eval.at_end": False}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _run(config, workdir):
    """(workdir, params, ema_params) after a 3-step run, as host numpy."""
    state = loop.train(config, str(workdir), progress=False)["final_state"]
    host = lambda t: None if t is None else jax.tree.map(np.asarray, jax.device_get(t))
    return str(workdir), host(state.params), host(state.ema_params)


@pytest.fixture(scope="module")
def clip_run(data_dir, tmp_path_factory):
    return _run(tiny_config(data_dir, **STEPS), tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def albef_run(data_dir, tmp_path_factory):
    """An ALBEF workdir whose checkpoint has a student unlike its EMA teacher, written
    directly (compiling ALBEF's train step would triple this file's time)."""
    workdir = str(tmp_path_factory.mktemp("albef"))
    config = albef_config(data_dir, **STEPS)
    setup = setup_lib.Setup(config, workdir)
    workdir_lib.save_config_json(config, workdir)
    state = setup.fresh_state()
    state = state.replace(params=jax.tree.map(lambda x: x * 0.5 + 0.25, state.params))
    setup.save(7, state, {"data_position": 0})
    setup.checkpointer.close()
    host = lambda t: jax.tree.map(np.asarray, jax.device_get(t))
    return workdir, host(state.params), host(state.ema_params)


@pytest.fixture(scope="module")
def clip_export(clip_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clip_safetensors"))
    return out, formats.export_workdir(clip_run[0], out, "safetensors")


def _flat(tree):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_bits_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        assert fa[k].tobytes() == fb[k].tobytes(), k


def _live_family(workdir):
    return zoo.build(workdir_lib.load_config_json(workdir).model)


def test_safetensors_round_trip_is_bit_exact(clip_run, clip_export):
    workdir, params, _ = clip_run
    out, summary = clip_export
    family, loaded = formats.load_safetensors(out)
    _assert_bits_equal(loaded, params)
    live = _live_family(workdir)
    assert type(family) is type(live) and family.model == live.model
    assert summary["param_count"] == sum(x.size for x in jax.tree.leaves(params))
    assert summary["files"]["model.safetensors"] == os.path.getsize(os.path.join(out, "model.safetensors"))
    _, meta = formats.read_safetensors(os.path.join(out, "model.safetensors"))
    assert (meta["format_version"], meta["family"], meta["weights"], meta["step"]) == ("1", "clip", "student", "3")
    assert meta["mmjax_version"]
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config == json.loads(meta["model_config"])
    assert config["vocab_size"] > 0 and (config["image_size"], config["text_len"]) == (16, 16)


@pytest.mark.parametrize("native", [True, False], ids=["bf16", "bf16-as-uint16"])
def test_safetensors_bfloat16_round_trip(clip_export, tmp_path, monkeypatch, native):
    """bf16 params come back bit-exact: as safetensors BF16 where the package writes
    it from numpy, else as their raw bits in uint16 named in the metadata."""
    assert formats._native_bf16()  # safetensors >= 0.8; the fallback is forced below
    if not native:
        monkeypatch.setattr(formats, "_native_bf16", lambda: False)
    out = str(tmp_path / "model.safetensors")
    family, params = formats.load_safetensors(clip_export[0])
    with open(os.path.join(clip_export[0], "config.json")) as f:
        formats.save_safetensors(out, params, json.load(f), dtype="bfloat16")
    _, loaded = formats.load_safetensors(out)
    _assert_bits_equal(loaded, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    header = serving.read_safetensors(out, with_metadata=True)
    assert header[1]["param_dtype"] == "bfloat16"
    assert (formats._BF16_AS_U16 in header[1]) == (not native)
    kernel = "image_tower/encoder/block00/attn/qkv/kernel"
    assert header[0][kernel].dtype == (jnp.bfloat16 if native else np.uint16)
    if native:  # the numpy-only reader of serving.py reads BF16 too
        _assert_bits_equal(header[0], _flat(loaded))


def _rewrite(src, dst, edit):
    tensors, meta = formats.read_safetensors(src)
    stn.save_file(edit(dict(tensors)), dst, metadata=meta)
    return dst


def test_safetensors_mismatch_names_the_key(clip_export, tmp_path):
    src = os.path.join(clip_export[0], "model.safetensors")
    key = "text_tower/encoder/block00/mlp/fc1/kernel"
    cases = {
        "shape": (lambda t: {**t, key: t[key][:-1]}, "the model expects float32["),
        "dtype": (lambda t: {**t, key: t[key].astype(np.float16)}, "float16"),
        "missing": (lambda t: {k: v for k, v in t.items() if k != key}, "missing"),
        "extra": (lambda t: {**t, "head/kernel": np.zeros(3, np.float32)}, "'head/kernel'"),
    }
    for name, (edit, says) in cases.items():
        path = _rewrite(src, str(tmp_path / f"{name}.safetensors"), edit)
        with pytest.raises(ValueError) as e:
            formats.load_safetensors(path)
        if name != "extra":
            assert repr(key) in str(e.value), name
        assert says in str(e.value), (name, str(e.value))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(src, "rb").read()[:-100])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        formats.load_safetensors(str(truncated))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        serving.read_safetensors(str(truncated))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors"):
        formats.load_safetensors(str(junk))


SERVE = textwrap.dedent("""
    import sys
    for name in ("flax", "mmjax.models", "mmjax.train", "orbax", "orbax.checkpoint", "tensorflow"):
        sys.modules[name] = None  # importing any of them now fails
    import numpy as np
    from mmjax.export.serving import Encoders
    out, inputs, result = sys.argv[1:]
    enc = Encoders(out)
    x = dict(np.load(inputs))
    res = {k: (enc.image if k.startswith("image") else enc.text)(v) for k, v in x.items()}
    res["ids"] = enc.tokenize(["a red circle", "A Big Blue Square left of a small green triangle " * 3])
    np.savez(result, **res)
""")


def test_stablehlo_served_without_flax_matches_live_model(clip_run, tmp_path):
    workdir, params, _ = clip_run
    out = str(tmp_path / "hlo")
    summary = formats.export_workdir(workdir, out, "stablehlo")
    assert set(summary["files"]) == {
        "image_encoder.stablehlo",
        "text_encoder.stablehlo",
        "model.safetensors",
        "export.json",
        "tokenizer.model",
    }
    spec = json.load(open(os.path.join(out, "export.json")))
    assert spec["image"]["input"] == {"shape": ["b", 16, 16, 3], "dtype": "float32"}
    assert spec["text"]["input"] == {"shape": ["b", 16], "dtype": "int32"}
    assert spec["image"]["output"] == {"shape": ["b", 32], "dtype": "float32"}
    assert spec["platforms"] == ["cpu", "cuda"] and spec["matmul_precision"] == "default"
    assert len(spec["image"]["mean"]) == len(spec["image"]["std"]) == 3
    rng = np.random.default_rng(0)
    inputs = {}
    for b in (3, 5):  # the export traced no example batch; b is symbolic
        inputs[f"image{b}"] = rng.normal(size=(b, 16, 16, 3)).astype(np.float32)
        text = rng.integers(6, 40, size=(b, 16)).astype(np.int32)
        text[:, 0], text[:, 9], text[:, 10:] = 2, 3, 0
        inputs[f"text{b}"] = text
    np.savez(tmp_path / "in.npz", **inputs)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    subprocess.run(
        [sys.executable, "-c", SERVE, out, str(tmp_path / "in.npz"), str(tmp_path / "res.npz")],
        check=True,
        env=env,
        cwd=ROOT,
    )
    res = dict(np.load(tmp_path / "res.npz"))
    family = _live_family(workdir)
    live = {"image": jax.jit(family.encode_image), "text": jax.jit(family.encode_text)}
    for k, x in inputs.items():
        want = np.asarray(live[k.rstrip("0123456789")](params, x))
        assert res[k].shape == want.shape == (x.shape[0], 32)
        np.testing.assert_allclose(res[k], want, atol=1e-5, rtol=0, err_msg=k)
    tok = Tokenizer(os.path.join(workdir, "tokenizer.model"))
    np.testing.assert_array_equal(
        res["ids"], tok.encode(["a red circle", "A Big Blue Square left of a small green triangle " * 3], 16)
    )
    enc = serving.Encoders(out)  # and in this process: a wrong shape is refused clearly
    with pytest.raises(ValueError, match=r"must be \[B, 16, 16, 3\], got \[2, 8, 8, 3\]"):
        enc.image(np.zeros((2, 8, 8, 3), np.float32))


def test_ema_or_student_weights(albef_run, clip_run, tmp_path):
    workdir, params, ema = albef_run
    loaded = {}
    for weights in ("student", "ema"):
        summary = formats.export_workdir(workdir, str(tmp_path / weights), "safetensors", weights=weights)
        assert (summary["weights"], summary["step"]) == (weights, 7)
        family, loaded[weights] = formats.load_safetensors(str(tmp_path / weights))
        assert type(family).__name__ == "AlbefFamily"
    _assert_bits_equal(loaded["student"], params)
    _assert_bits_equal(loaded["ema"], ema)
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded["student"]), jax.tree.leaves(loaded["ema"]))
    )
    # The fusion families' encoders export too, here from the teacher's weights.
    out = str(tmp_path / "hlo_ema")
    formats.export_workdir(workdir, out, "stablehlo", weights="ema", platforms=("cpu",))
    enc, family = serving.Encoders(out), _live_family(workdir)
    rng = np.random.default_rng(1)
    image = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
    text = rng.integers(6, 40, size=(5, 16)).astype(np.int32)
    np.testing.assert_allclose(enc.image(image), jax.jit(family.encode_image)(ema, image), atol=1e-5, rtol=0)
    np.testing.assert_allclose(enc.text(text), jax.jit(family.encode_text)(ema, text), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no EMA teacher"):
        formats.export_workdir(clip_run[0], str(tmp_path / "clip_ema"), "safetensors", weights="ema")
    with pytest.raises(ValueError, match="valid choices"):
        formats.export_workdir(clip_run[0], str(tmp_path / "x"), "onnx")


def test_export_command(clip_run, tmp_path, capsys):
    """`mmjax export` writes what the API writes; bad choices exit with code 2."""
    from mmjax import cli

    workdir, params, _ = clip_run
    out = tmp_path / "st"
    assert cli.main(["export", "--workdir", workdir, "--format", "safetensors", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["format"] == "safetensors" and summary["param_count"] > 0
    _, loaded = formats.load_safetensors(str(out))
    _assert_bits_equal(loaded, params)
    assert (
        cli.main(["export", "--workdir", workdir, "--format", "safetensors", "--out", str(out), "--weights", "ema"])
        == 2
    )
    assert "ema" in capsys.readouterr().err
