"""Export a trained workdir: `safetensors` (params + model config) and `stablehlo`
(serialized image and text encoders); `load_safetensors` reads the first back.

`mmjax export --workdir DIR --format F --out OUT [--weights student|ema]` calls
`export_workdir(DIR, OUT, F, weights)`. OUT is a directory:

safetensors
  OUT/model.safetensors   every param under its flat name
                          ('image_tower/encoder/block00/attn/qkv/kernel'); the header
                          metadata holds the format version, mmjax version, family,
                          weights (student|ema), source step and the model config
  OUT/config.json         the same model config (the workdir's `model` section with
                          the values set at run time: vocab_size, image_size, text_len)
  `load_safetensors(OUT or OUT/model.safetensors) -> (family, params)` rebuilds the
  family with `mmjax.models.zoo.build` and checks every name, shape and dtype against
  the family's `init_params`; no orbax involved.

stablehlo
  OUT/image_encoder.stablehlo   `jax.export` of params, image [b, H, W, 3] f32 -> [b, E]
  OUT/text_encoder.stablehlo    `jax.export` of params, ids [b, L] i32 -> [b, E]
  OUT/model.safetensors         the params both encoders take (as above)
  OUT/export.json               input/output shapes and dtypes, the params' order,
                                image mean/std, text length and special ids
  OUT/tokenizer.model           the run's sentencepiece model
  The outputs are the L2-normalised embeddings mmjax's retrieval ranks by; `b` is a
  symbolic batch size. `mmjax.export.serving.Encoders(OUT)` runs them with jax and
  numpy only. They are lowered for CPU and CUDA (`platforms`), so one file serves
  both; on a GPU float32 matmuls use TF32 unless exported with precision='highest'.

  The params are an input of the exported functions, not constants baked into them:
  the weights are stored once (one standard safetensors file that both encoders, and
  `load_safetensors`, read) instead of twice inside two programs; the programs stay a
  few hundred KB whatever the model size (a serialized module with the weights of a
  ViT-L inside passes 2 GB, and XLA compiles large constants slowly); a server puts
  the weights on its devices once and can shard them; weights of the same shapes (a
  later checkpoint, the EMA teacher) swap in without re-exporting. The price is a
  loader that reads one safetensors file, 20 lines of numpy in `serving.py`.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.export import stablehlo
from mmjax.export.stablehlo import DEFAULT_PLATFORMS, IMAGE_FILE, TEXT_FILE  # noqa: F401 - the layout's names

FORMATS = ("safetensors", "stablehlo")
FORMAT_VERSION = "1"
PARAMS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_JSON = "export.json"
TOKENIZER_FILE = "tokenizer.model"
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}
_BF16_AS_U16 = "bf16_as_uint16"  # metadata: names stored as the raw bits of bfloat16


def mmjax_version() -> str:
    try:
        from importlib.metadata import version

        return version("mmjax")
    except Exception:  # noqa: BLE001 - not installed (a source checkout)
        return "unknown"


# ----------------------------------------------------------------------------- workdir


def _restore(workdir: str, weights: str, step: int | None = None):
    """(params as host numpy, info) of a workdir's newest usable (or `step`'s) checkpoint."""
    from mmjax import workdir as workdir_lib

    opened = workdir_lib.open_workdir(workdir, weights=weights, step=step)
    config = opened.config
    info = dict(
        config=config,
        workdir=opened,
        family=opened.family,
        step=opened.step,
        weights=weights,
        model_config=json.loads(config.model.to_json_best_effort()),
    )
    return opened.params, info


def export_workdir(
    workdir: str,
    out: str,
    fmt: str,
    weights: str = "student",
    *,
    step: int | None = None,
    dtype: str | None = None,
    platforms=DEFAULT_PLATFORMS,
    precision: str | None = None,
) -> dict:
    """Exports a workdir's checkpoint to directory `out` in format `fmt`.

    fmt: 'safetensors' or 'stablehlo' (see the module docstring); weights: 'student'
    (the trained params) or 'ema' (the momentum teacher, ALBEF-style families);
    step: a checkpoint step (default the latest); dtype: safetensors only, store the
    floating params as 'bfloat16' (half the bytes) or 'float32'; platforms: stablehlo
    only, the platforms the encoders are lowered for (one file serves all);
    precision: stablehlo only, the matmul precision baked into the encoders: None
    (jax's default: TF32 tensor cores for float32 on recent NVIDIA GPUs, as the live
    model runs there; ~3e-4 from the CPU result) or 'highest' (float32 everywhere).
    Returns a summary: {format, out, files: {name: bytes}, bytes, param_count,
    family, weights, step}.
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}; valid choices: {', '.join(FORMATS)}")
    if precision is not None and fmt != "stablehlo":
        raise ValueError("precision applies to the stablehlo format only")
    if dtype is not None and fmt != "safetensors":
        raise ValueError(
            "dtype applies to the safetensors format only (the stablehlo "
            "encoders take the params in the dtype they were trained in)"
        )
    params, info = _restore(workdir, weights, step)
    os.makedirs(out, exist_ok=True)
    meta = dict(family=info["model_config"]["family"], weights=weights, step=info["step"])
    if fmt == "safetensors":
        files = [save_safetensors(os.path.join(out, PARAMS_FILE), params, info["model_config"], dtype=dtype, **meta)]
        files.append(_write_json(os.path.join(out, CONFIG_FILE), info["model_config"]))
    else:
        files = _export_stablehlo(info, params, out, tuple(platforms), precision)
    sizes = {os.path.basename(f): os.path.getsize(f) for f in files}
    return dict(
        format=fmt,
        out=os.path.abspath(out),
        files=sizes,
        bytes=sum(sizes.values()),
        param_count=int(sum(np.size(x) for x in jax.tree.leaves(params))),
        **meta,
    )


def _write_json(path: str, obj) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- safetensors


def flatten(params) -> dict:
    """Param tree -> {flat name: numpy array}, in tree order."""
    from mmjax.parallel.sharding import path_str

    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _native_bf16() -> bool:
    """Whether this safetensors writes and reads back ml_dtypes bfloat16 numpy arrays
    through files (0.8 does; its in-memory `load(bytes)` does not)."""
    import tempfile

    import safetensors.numpy as stn

    x = np.asarray([1.5, -2.0], jnp.bfloat16)
    try:
        with tempfile.TemporaryDirectory() as d:
            stn.save_file({"x": x}, os.path.join(d, "x.safetensors"))
            y = stn.load_file(os.path.join(d, "x.safetensors"))["x"]
        return y.dtype == x.dtype and np.array_equal(y.view(np.uint16), x.view(np.uint16))
    except Exception:  # noqa: BLE001 - any failure means: store the raw bits
        return False


def save_safetensors(
    path: str,
    params,
    model_config: dict,
    *,
    family: str | None = None,
    weights: str = "student",
    step: int = 0,
    dtype: str | None = None,
) -> str:
    """Writes `params` (a param tree) to `path` with the model config in the header.

    bfloat16 params are stored as safetensors' BF16 (readable by torch and friends);
    with a safetensors that cannot write ml_dtypes bfloat16 from numpy, as their raw
    bits in uint16 with the names listed in the metadata (`load_safetensors` undoes it).
    """
    import safetensors.numpy as stn

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; valid choices: {', '.join(DTYPES)}")
    tensors = flatten(params)
    if dtype is not None:
        tensors = {
            k: v.astype(DTYPES[dtype]) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in tensors.items()
        }
    model_config = dict(model_config)
    meta = {
        "format": "mmjax",
        "format_version": FORMAT_VERSION,
        "mmjax_version": mmjax_version(),
        "family": str(family or model_config.get("family")),
        "weights": str(weights),
        "step": str(int(step)),
        "model_config": json.dumps(model_config, sort_keys=True),
    }
    if dtype is not None:
        meta["param_dtype"] = dtype
    raw = [k for k, v in tensors.items() if v.dtype == jnp.bfloat16]
    if raw and not _native_bf16():
        tensors.update({k: tensors[k].view(np.uint16) for k in raw})
        meta[_BF16_AS_U16] = json.dumps(raw)
    tensors = {k: np.array(v, order="C", copy=not v.flags.c_contiguous) for k, v in tensors.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    stn.save_file(tensors, tmp, metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates it 0600; an export is for sharing
    os.replace(tmp, path)
    return path


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(tensors {name: numpy array}, header metadata) of a file mmjax wrote."""
    import safetensors
    import safetensors.numpy as stn

    path = _params_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: export with `mmjax export --format safetensors`")
    try:
        with safetensors.safe_open(path, framework="np") as f:
            meta = dict(f.metadata() or {})
        tensors = stn.load_file(path)
    except Exception as e:  # noqa: BLE001 - e.g. an older safetensors without numpy BF16
        from mmjax.export import serving

        try:  # the plain-numpy reader of the serving loader knows BF16
            tensors, meta = serving.read_safetensors(path, with_metadata=True)
        except Exception:  # noqa: BLE001 - report the first reader's error
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    for k in json.loads(meta.get(_BF16_AS_U16, "[]")):
        tensors[k] = tensors[k].view(jnp.bfloat16)
    return tensors, meta


def _params_path(path: str) -> str:
    return os.path.join(path, PARAMS_FILE) if os.path.isdir(path) else path


def _fmt(shape, dtype) -> str:
    return f"{np.dtype(dtype).name}[{','.join(str(d) for d in shape)}]"


def load_safetensors(path: str):
    """(family, params) from an export (its directory or its .safetensors file).

    The family is rebuilt from the model config in the header with
    `mmjax.models.zoo.build`; params is the exact tree of `family.init_params`, host
    numpy arrays (in the stored dtype: float32, or bfloat16 for a `dtype='bfloat16'`
    export). Raises ValueError naming the first key that is missing, unexpected, or
    of another shape or dtype than the model expects.
    """
    import ml_collections

    from mmjax.models import zoo

    path = _params_path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != "mmjax" or "model_config" not in meta:
        raise ValueError(
            f"{path}: no mmjax model config in the safetensors header "
            f"(metadata keys {sorted(meta)}); was it written by mmjax export?"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {meta.get('format_version')!r}, this mmjax reads version {FORMAT_VERSION}"
        )
    family = zoo.build(ml_collections.ConfigDict(json.loads(meta["model_config"])))
    expected = jax.eval_shape(family.init_params, jax.random.PRNGKey(0))
    stored_dtype = DTYPES[meta["param_dtype"]] if "param_dtype" in meta else None
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(expected)
    from mmjax.parallel.sharding import path_str

    leaves, seen = [], set()
    where = f"{path} (family {meta.get('family')!r})"
    for p, want in leaves_with_path:
        name = path_str(p)
        dtype = want.dtype
        if stored_dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            dtype = stored_dtype
        if name not in tensors:
            raise ValueError(
                f"{where}: param {name!r} ({_fmt(want.shape, dtype)}) is missing "
                f"from the file ({len(tensors)} tensors; the model has {len(leaves_with_path)})"
            )
        x = tensors[name]
        if tuple(x.shape) != tuple(want.shape) or x.dtype != dtype:
            raise ValueError(
                f"{where}: param {name!r} is {_fmt(x.shape, x.dtype)} in the file, "
                f"the model expects {_fmt(want.shape, dtype)}"
            )
        leaves.append(x)
        seen.add(name)
    extra = sorted(set(tensors) - seen)
    if extra:
        raise ValueError(f"{where}: the file has {len(extra)} tensor(s) the model does not, first {extra[0]!r}")
    return family, jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- stablehlo


def _export_stablehlo(info, params, out: str, platforms, precision=None) -> list[str]:
    from mmjax.data import pipeline

    config, opened = info["config"], info["workdir"]
    data = config.data
    image_size, text_len = int(data.image_size), int(data.text_len)
    tok = opened.tokenizer  # the special ids in export.json are the run's
    exp_image, exp_text, names = stablehlo.export_encoders(
        info["family"], params, image_size=image_size, text_len=text_len, platforms=platforms, precision=precision
    )
    files = stablehlo.write_programs(exp_image, exp_text, out)
    files.append(
        save_safetensors(
            os.path.join(out, PARAMS_FILE), params, info["model_config"], weights=info["weights"], step=info["step"]
        )
    )
    shutil.copyfile(tok.model_path, os.path.join(out, TOKENIZER_FILE))
    files.append(os.path.join(out, TOKENIZER_FILE))
    mean, std = pipeline.MEAN, pipeline.STD  # the pipeline's normalisation (not a config key)
    spec = {
        "format": "mmjax-stablehlo",
        "format_version": int(FORMAT_VERSION),
        "mmjax_version": mmjax_version(),
        "jax_version": jax.__version__,
        "family": info["model_config"]["family"],
        "weights": info["weights"],
        "step": info["step"],
        "platforms": list(exp_image.platforms),
        "matmul_precision": precision or "default",
        "params": {
            "file": PARAMS_FILE,
            "order": names,
            "note": "both encoders take these tensors, as a list in this order, first",
        },
        "image": stablehlo.image_spec(exp_image, image_size, mean, std),
        "text": stablehlo.text_spec(exp_text, text_len, tok, TOKENIZER_FILE),
        "output": "L2-normalised embeddings; cosine similarity = dot product",
    }
    files.append(_write_json(os.path.join(out, EXPORT_JSON), spec))
    return files
