"""StableHLO encoders of a model: `jax.export` of `family.encode_image` and
`encode_text` with the params as an input, and the `export.json` that describes them
(`mmjax export --format stablehlo`; the layout is in `mmjax.export.formats`)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_FILE = "image_encoder.stablehlo"
TEXT_FILE = "text_encoder.stablehlo"
DEFAULT_PLATFORMS = ("cpu", "cuda")


def export_encoders(
    family, params, *, image_size: int, text_len: int, platforms=DEFAULT_PLATFORMS, precision: str | None = None
):
    """(image Exported, text Exported, param names in argument order).

    Each takes `(params: list of arrays in that order, x)` with x an image batch
    [b, H, W, 3] float32 or ids [b, L] int32 (b symbolic) and returns the
    L2-normalised [b, E] float32 embeddings of `family.encode_image` / `encode_text`.
    precision: None (jax's default) or a `jax.default_matmul_precision` value such as
    'highest', fixed in the exported programs.
    """
    from jax import export

    from mmjax.parallel.sharding import path_str

    if not family.can("encode"):
        raise ValueError(
            f"stablehlo export needs the family's encode_image / encode_text (capability 'encode'); "
            f"{type(family).__name__} has none"
        )
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    avals = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in leaves]

    def tower(method):
        def fn(flat_params, x):
            return method(jax.tree_util.tree_unflatten(treedef, flat_params), x)

        return jax.jit(fn)

    image = jax.ShapeDtypeStruct(export.symbolic_shape(f"b, {image_size}, {image_size}, 3"), jnp.float32)
    text = jax.ShapeDtypeStruct(export.symbolic_shape(f"b, {text_len}"), jnp.int32)
    with jax.default_matmul_precision(precision):
        exp_image = export.export(tower(family.encode_image), platforms=platforms)(avals, image)
        exp_text = export.export(tower(family.encode_text), platforms=platforms)(avals, text)
    return exp_image, exp_text, names


def write_programs(exp_image, exp_text, out: str) -> list[str]:
    """Writes the two serialized programs into `out`; returns their paths."""
    files = []
    for name, exp in ((IMAGE_FILE, exp_image), (TEXT_FILE, exp_text)):
        path = os.path.join(out, name)
        with open(path + ".tmp", "wb") as f:
            f.write(exp.serialize())
        os.replace(path + ".tmp", path)
        files.append(path)
    return files


def _aval_json(aval) -> dict:
    return dict(shape=[d if isinstance(d, int) else str(d) for d in aval.shape], dtype=np.dtype(aval.dtype).name)


def image_spec(exp_image, image_size: int, mean, std) -> dict:
    """export.json's `image` entry."""
    return {
        "file": IMAGE_FILE,
        "input": _aval_json(exp_image.in_avals[-1]),
        "output": _aval_json(exp_image.out_avals[0]),
        "image_size": int(image_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "preprocess": "RGB pixels resized to image_size, x / 255, then (x - mean) / std",
    }


def text_spec(exp_text, text_len: int, tokenizer, tokenizer_file: str | None) -> dict:
    """export.json's `text` entry: the special ids come from the run's tokenizer."""
    return {
        "file": TEXT_FILE,
        "input": _aval_json(exp_text.in_avals[-1]),
        "output": _aval_json(exp_text.out_avals[0]),
        "text_len": int(text_len),
        "pad_id": int(tokenizer.pad_id),
        "bos_id": int(tokenizer.bos_id),
        "eos_id": int(tokenizer.eos_id),
        "vocab_size": int(tokenizer.vocab_size),
        "lowercase": True,
        "tokenizer": tokenizer_file,
        "preprocess": "lower-case, sentencepiece ids, [bos] + ids[:text_len - 2] + [eos], padded with pad_id to text_len",
    }
