"""mmjax workdirs <-> transformers CLIP directories (`mmjax convert` / `mmjax export
--format hf-clip`); the param mapping itself is `mmjax.export.hf`.

    hf_workdir.convert_to_workdir(HF_DIR, WORKDIR)   # config.json + a params-only step 0
    hf_workdir.export_workdir(WORKDIR, OUT)          # a CLIP workdir's params -> HF_DIR

A converted workdir is read as every workdir is (`mmjax.workdir.open_workdir`):
`mmjax finetune --init-from WORKDIR`, `embed`, `classify`, `export` and
`mmjax.load(WORKDIR)` take it as it is.

An export directory holds config.json + model.safetensors (CLIPModel),
preprocessor_config.json (CLIPImageProcessor: the run's image size and mean/std),
README.md (a model card, `hf_card.py`: the training config, step, data, mmjax
version, how it was exported and how to tokenize) and the run's sentencepiece
tokenizer.model. mmjax's tokenizer is not a CLIPTokenizer (BPE), so no tokenizer
files transformers would load are written; the card shows how to make the ids with
sentencepiece.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from mmjax import workdir as workdir_lib
from mmjax.export import hf
from mmjax.export.hf import check_exportable, model_config, read_clip, save_clip
from mmjax.export.hf_card import model_card

TOKENIZER_FILE = "tokenizer.model"  # sentencepiece, as in a workdir
CARD_FILE = "README.md"


def _default_base_config():
    import mmjax
    from mmjax import config as config_lib

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(mmjax.__file__))), "configs", "demo.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found (mmjax installed without its configs/): pass base_config='path/to/configs/demo.py'"
        )
    return config_lib.recipe(path)


def converted_config(spec: dict, base_config=None, seed: int = 0):
    """The workdir config of an imported CLIP: base_config (a ConfigDict, 'path.py[:arg]'
    or None: configs/demo.py) with the model section describing the CLIP, data.image_size
    / data.text_len set to its sizes and model.keep_vocab_size (the vocabulary is the
    source's, not that of a tokenizer mmjax would train on the data); validated."""
    import ml_collections

    from mmjax import config as config_lib

    if base_config is None:
        config = _default_base_config()
    elif isinstance(base_config, str):
        path, _, arg = base_config.partition(":")
        config = config_lib.recipe(path, arg or None)
    else:
        config = ml_collections.ConfigDict(base_config.to_dict())
    with config.unlocked(), config.ignore_type():
        # Every key that shapes the CLIP's params is set; the rest (dtype, remat, ...) stays.
        for key, value in model_config(spec).items():
            config.model[key] = value
        config.data.image_size = spec["image_size"]
        config.data.text_len = spec["text_len"]
        config.seed = int(seed)
        config.model.keep_vocab_size = True
    config_lib.validate(config)
    return config


def _check_param_tree(family, params) -> None:
    """RuntimeError (a converter bug) unless `params` has the tree the family initialises."""
    import jax

    def shapes(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(k): (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat}

    want = shapes(jax.eval_shape(family.init_params, jax.random.PRNGKey(0)))
    got = shapes(params)
    if want != got:
        raise RuntimeError(
            "the converted params do not match the tree mmjax's CLIP initialises "
            f"(a converter bug): {sorted(set(want.items()) ^ set(got.items()))[:6]}"
        )


def convert_to_workdir(src_dir: str, workdir: str, *, base_config=None, seed: int = 0):
    """An mmjax workdir from a transformers CLIPModel directory; returns its config.

    Writes `workdir/config.json` (`converted_config`) and `workdir/checkpoints/0`: a
    params-only checkpoint (`mmjax.workdir.save_params`: the imported params, and the
    EMA teacher's starting copy for a family that keeps one; no optimizer state),
    which `mmjax finetune --init-from`, eval, export and `mmjax.load` read.
    base_config: a ConfigDict or 'path.py[:arg]'. Refuses a workdir that has checkpoints.
    """
    import jax

    from mmjax.models import zoo

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; convert into a new workdir")
    spec, params = read_clip(src_dir)
    config = converted_config(spec, base_config, seed)
    family = zoo.build(config.model)
    _check_param_tree(family, params)
    # Committed to one device: orbax writes unsharded arrays, which restore onto any mesh.
    params = jax.device_put(params, jax.local_devices()[0])
    extra = family.init_extra(params)  # {} unless the family keeps a teacher
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.save_config_json(config, workdir)
    meta = {"source": "hf-clip", "src": os.path.abspath(src_dir)}
    workdir_lib.save_params(workdir, params, ema_params=extra.get("ema_params"), step=0, meta=meta)
    return config


def read_workdir_params(workdir: str, weights: str = "student", step: int | None = None):
    """(config, params as numpy) of a workdir's newest usable (or `step`'s) checkpoint:
    `mmjax.workdir.read_params`, the one params reader."""
    params, _ = workdir_lib.read_params(workdir, weights, step)
    return workdir_lib.load_config_json(workdir), params


def checkpoint_step(workdir: str, step: int | None = None) -> int:
    """`step` if the workdir's checkpoint there verifies, else (None) the newest step
    that does (`mmjax.workdir.usable_step`)."""
    return workdir_lib.usable_step(workdir, step)


def export_workdir(workdir: str, out_dir: str, weights: str = "student", *, step: int | None = None) -> str:
    """A CLIP-family workdir's latest (or `step`'s) params -> transformers CLIPModel dir.

    weights: 'student' or 'ema'. A workdir of another family, or a CLIP whose settings
    or shapes transformers cannot express, raises ValueError naming the mismatch.
    A model with mmjax's text_pool='last' is written with the eos id of the workdir's
    tokenizer (tokenizer.model), pooling at the first eos.
    """
    from mmjax.models import zoo

    config = workdir_lib.load_config_json(workdir)
    family = config.model.get("family")
    if family != "clip":
        raise ValueError(
            f"hf-clip export needs a CLIP-family workdir; {workdir} holds a {family!r} model, "
            "whose fusion / ITM layers transformers' CLIPModel has no place for"
        )
    check_exportable(zoo.build(config.model).model)  # before reading the checkpoint
    opened = workdir_lib.open_workdir(workdir, weights=weights, step=step, config=config)
    tokenizer = opened.tokenizer_path
    mean = std = None  # save_clip's default: the pipeline's normalisation (not a config key)
    token_ids = opened.tokenizer.special_ids if tokenizer else None  # None: mmjax's ids
    out = save_clip(
        opened.family.model, {"params": opened.params}, out_dir, token_ids=token_ids, image_mean=mean, image_std=std
    )
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(out, TOKENIZER_FILE))
    with open(os.path.join(out, hf.PREPROCESSOR_FILE)) as f:
        preprocessor = json.load(f)
    card = model_card(
        config,
        workdir=workdir,
        step=opened.step,
        weights=weights,
        preprocessor=preprocessor,
        tokenizer=TOKENIZER_FILE if tokenizer else None,
        tokenizer_path=tokenizer,
    )
    with open(os.path.join(out, CARD_FILE), "w") as f:
        f.write(card)
    return out
