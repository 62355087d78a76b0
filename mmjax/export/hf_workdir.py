"""mmjax workdirs <-> transformers CLIP directories (`mmjax convert` / `mmjax export
--format hf-clip`); the param mapping itself is `mmjax.export.hf`.

    hf_workdir.convert_to_workdir(HF_DIR, WORKDIR)   # config.json + a step-0 checkpoint
    hf_workdir.export_workdir(WORKDIR, OUT)          # a CLIP workdir's params -> HF_DIR

An export directory holds config.json + model.safetensors (CLIPModel),
preprocessor_config.json (CLIPImageProcessor: the run's image size and mean/std),
README.md (a model card: the training config, step, data, mmjax version, how it was
exported and how to tokenize) and the run's sentencepiece tokenizer.model. mmjax's
tokenizer is not a CLIPTokenizer (BPE), so no tokenizer files transformers would load
are written; the card shows how to make the ids with sentencepiece.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from mmjax.export import hf
from mmjax.export.hf import check_exportable, model_config, read_clip, save_clip


def _default_base_config():
    import mmjax
    from mmjax import config as config_lib

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(mmjax.__file__))), "configs", "demo.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found (mmjax installed without its configs/): pass base_config='path/to/configs/demo.py'"
        )
    return config_lib.recipe(path)


def convert_to_workdir(src_dir: str, workdir: str, *, base_config=None, seed: int = 0):
    """An mmjax workdir from a transformers CLIPModel directory; returns its config.

    Writes `workdir/config.json` (base_config, default configs/demo.py, with the model
    section describing the imported CLIP and data.image_size / data.text_len set to its
    sizes) and `workdir/checkpoints/0`: a TrainState at step 0 with the imported params,
    a fresh optimizer state and the layout `mmjax.train.step.state_plan` gives.
    base_config: a ConfigDict or 'path.py[:arg]'. Refuses a workdir that has checkpoints.
    """
    import jax
    import jax.numpy as jnp
    import ml_collections

    from mmjax import checkpoint as ckpt_lib
    from mmjax import config as config_lib
    from mmjax import workdir as workdir_lib
    from mmjax.models import zoo
    from mmjax.parallel import mesh as mesh_lib
    from mmjax.train import optim
    from mmjax.train import step as step_lib
    from mmjax.train.state import TrainState

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; convert into a new workdir")
    spec, params = read_clip(src_dir)
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
        # The vocabulary is the HF tokenizer's, not one mmjax trains on the data: Setup
        # keeps this vocab_size instead of taking its own tokenizer's.
        config.model.keep_vocab_size = True
    config_lib.validate(config)

    family = zoo.build(config.model)
    optimizer = optim.make_optimizer(config.train)
    # One device: a checkpoint restores onto any mesh (Setup.restore), and orbax writes
    # unsharded arrays without slicing each one per device.
    mesh = mesh_lib.make_mesh(None, devices=jax.local_devices()[:1])
    image_shape = (1, spec["image_size"], spec["image_size"], 3)
    text_shape = (1, spec["text_len"])
    _, abstract, shardings = step_lib.state_plan(family, optimizer, mesh, image_shape, text_shape)
    shapes = lambda tree: {
        jax.tree_util.keystr(k): (tuple(v.shape), np.dtype(v.dtype))
        for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    want, got = shapes(abstract.params), shapes(params)
    if want != got:
        raise RuntimeError(
            "the converted params do not match the tree mmjax's CLIP initialises "
            f"(a converter bug): {sorted(set(want.items()) ^ set(got.items()))[:6]}"
        )

    def make_state(p, rng):  # as step.init_state, with the imported params
        _, state_rng = jax.random.split(rng)
        p = jax.tree_util.tree_map(jnp.asarray, p)
        extra = family.init_extra(p) if hasattr(family, "init_extra") else {}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=p,
            opt_state=optimizer.init(p),
            ema_params=extra.get("ema_params"),
            queues=extra.get("queues"),
            rng=state_rng,
        )

    state = jax.jit(make_state, out_shardings=shardings)(params, jax.random.PRNGKey(int(seed)))
    if jax.tree_util.tree_structure(state) != jax.tree_util.tree_structure(abstract):
        raise RuntimeError("the converted state's structure differs from step.state_plan's")
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.save_config_json(config, workdir)
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=int(config.train.get("keep_checkpoints", 2)), async_save=False)
    ckpt.save(0, state, {"data_position": 0, "source": "hf-clip", "src": os.path.abspath(src_dir)})
    ckpt.close()
    return config


def read_workdir_params(workdir: str, weights: str = "student", step: int | None = None):
    """(config, params as numpy) of a workdir's latest (or `step`'s) checkpoint.

    Reads only the params (or the EMA teacher) onto one device with orbax, whatever
    mesh wrote them; no tokenizer, data or optimizer needed.
    """
    import jax
    import orbax.checkpoint as ocp

    from mmjax import workdir as workdir_lib

    if weights not in ("student", "ema"):
        raise ValueError(f"weights {weights!r}; valid choices: student, ema")
    config = workdir_lib.load_config_json(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    step = checkpoint_step(workdir, step)
    # Absolute: orbax reads no metadata from a relative path (metadata() gives None).
    path = os.path.abspath(os.path.join(ckpt_dir, str(int(step)), "state"))
    key = "params" if weights == "student" else "ema_params"
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if tree.get(key) is None:
        raise ValueError(
            f"weights={weights!r}: the {config.model.get('family')!r} checkpoint in {workdir} "
            "has no EMA teacher; use weights='student'"
        )
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    target = {
        key: jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree[key], is_leaf=is_leaf
        )
    }
    restored = ckptr.restore(
        path,
        args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        ),
    )
    return config, jax.tree_util.tree_map(np.asarray, restored[key])


def checkpoint_step(workdir: str, step: int | None = None) -> int:
    """`step` if the workdir's checkpoint there verifies against its manifest, else
    (None) the newest step that does (`checkpoint.usable_step`: damaged steps are
    reported and passed over, as every other reader of a workdir does)."""
    from mmjax import checkpoint as ckpt_lib

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if step is not None and not os.path.isdir(os.path.join(ckpt_dir, str(int(step)))):
        raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt_dir}")
    return int(ckpt_lib.usable_step(ckpt_dir, step))


def export_workdir(workdir: str, out_dir: str, weights: str = "student", *, step: int | None = None) -> str:
    """A CLIP-family workdir's latest (or `step`'s) params -> transformers CLIPModel dir.

    weights: 'student' or 'ema'. A workdir of another family, or a CLIP whose settings
    or shapes transformers cannot express, raises ValueError naming the mismatch.
    A model with mmjax's text_pool='last' is written with the eos id of the workdir's
    tokenizer (tokenizer.model), pooling at the first eos.
    """
    from mmjax import workdir as workdir_lib
    from mmjax.models import zoo

    config = workdir_lib.load_config_json(workdir)
    family = config.model.get("family")
    if family != "clip":
        raise ValueError(
            f"hf-clip export needs a CLIP-family workdir; {workdir} holds a {family!r} model, "
            "whose fusion / ITM layers transformers' CLIPModel has no place for"
        )
    clip = zoo.build(config.model).model
    check_exportable(clip)  # before reading the checkpoint
    step = checkpoint_step(workdir, step)
    _, params = read_workdir_params(workdir, weights, step)
    data = config.get("data", {})
    mean, std = data.get("mean", None), data.get("std", None)  # as formats' stablehlo export
    out = save_clip(
        clip, {"params": params}, out_dir, eos_id=_workdir_eos(workdir, config), image_mean=mean, image_std=std
    )
    tokenizer = _workdir_tokenizer(workdir, config)
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(out, TOKENIZER_FILE))
    with open(os.path.join(out, hf.PREPROCESSOR_FILE)) as f:
        preprocessor = json.load(f)
    with open(os.path.join(out, CARD_FILE), "w") as f:
        f.write(
            model_card(
                config,
                workdir=workdir,
                step=step,
                weights=weights,
                preprocessor=preprocessor,
                tokenizer=TOKENIZER_FILE if tokenizer else None,
                tokenizer_path=tokenizer,
            )
        )
    return out


TOKENIZER_FILE = "tokenizer.model"  # sentencepiece, as in a workdir
CARD_FILE = "README.md"


def _workdir_tokenizer(workdir, config):
    """The path of a workdir's sentencepiece model, or None."""
    path = config.data.get("tokenizer", {}).get("path") if "data" in config else None
    path = os.path.expanduser(path) if path else os.path.join(workdir, "tokenizer.model")
    return path if os.path.isfile(path) else None


def _workdir_eos(workdir, config):
    """The eos id of a workdir's sentencepiece tokenizer (None: mmjax's default, 3)."""
    path = _workdir_tokenizer(workdir, config)
    if path is None:
        return None
    from mmjax.data.tokenizer import Tokenizer

    return int(Tokenizer(path).eos_id)


def model_card(
    config,
    *,
    workdir: str,
    step: int,
    weights: str,
    preprocessor: dict,
    tokenizer: str | None,
    tokenizer_path: str | None = None,
) -> str:
    """README.md of an hf-clip export: what was trained on what, and how to use it.
    tokenizer: the sentencepiece file's name in the export (tokenizer_path: where it is)."""
    tokenizer_path = tokenizer_path or tokenizer
    from mmjax.export.formats import mmjax_version

    m, d, t = config.model, config.get("data", {}), config.get("train", {})
    get = lambda section, key, default="?": section.get(key, default) if section is not None else default
    tower = lambda name: (
        f"`{get(m, name)}`"
        + (f" with {dict(get(m, name + '_overrides', {}) or {})}" if get(m, name + "_overrides", {}) else "")
    )
    data_name = get(d, "name")
    if data_name == "files" and get(d, "path", None):
        data_name = f"files ({os.path.basename(str(d.path))})"
    imported = bool(get(m, "keep_vocab_size", False))
    size = preprocessor["size"]["height"]
    rows = [
        ("family", "CLIP (two towers, contrastive ITC, `model.loss=" + str(get(m, "loss")) + "`)"),
        ("image tower", f"{tower('image')}, {size}x{size} pixels"),
        ("text tower", f"{tower('text')}, {get(m, 'text_len')} tokens, vocabulary {get(m, 'vocab_size')}"),
        ("embedding dim", get(m, "embed_dim")),
        ("source", "imported with `mmjax convert --from hf-clip`" if imported else "trained by mmjax"),
        ("data", f"`{data_name}` (split `{get(d, 'train_split')}`)" if step or not imported else "none yet"),
        (
            "training",
            f"{get(t, 'steps')} steps, batch {get(t, 'batch_size')}, lr {get(t, 'lr')} "
            f"(warmup {get(t, 'warmup_steps')}), weight decay {get(t, 'weight_decay')}"
            if step or not imported
            else "none in mmjax (step 0 is the imported weights)",
        ),
        ("checkpoint", f"step {step}, {'EMA teacher' if weights == 'ema' else 'student'} weights"),
        ("mmjax", mmjax_version()),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    max_len = get(m, "text_len")
    if tokenizer:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
        text = f"""`{tokenizer}` is the run's [sentencepiece](https://github.com/google/sentencepiece) model
(pad={sp.pad_id()}, bos={sp.bos_id()}, eos={sp.eos_id()}). It is not a `CLIPTokenizer` (byte-level BPE): `CLIPProcessor`
and `AutoTokenizer` do not load it. Make the ids as mmjax does, lower-cased,
`[bos] + pieces[:{max_len} - 2] + [eos]`, padded with pad to {max_len}:

```python
import sentencepiece as spm
import torch

sp = spm.SentencePieceProcessor(model_file="{tokenizer}")
def tokenize(texts, max_len={max_len}):
    rows = [[sp.bos_id()] + sp.encode(t.lower())[:max_len - 2] + [sp.eos_id()] for t in texts]
    return torch.tensor([r + [sp.pad_id()] * (max_len - len(r)) for r in rows])

ids = tokenize(["a red circle left of a blue square"])
with torch.no_grad():
    out = model.get_text_features(input_ids=ids)
text_features = out if torch.is_tensor(out) else out.pooler_output
```"""
    else:
        text = (
            "The workdir had no sentencepiece tokenizer.model to copy; the text tower takes the "
            "ids of the tokenizer its source used."
        )
    return f"""---
library_name: transformers
tags:
- clip
- mmjax
---

# CLIP trained with mmjax

Exported by mmjax {mmjax_version()} with
`mmjax export --format hf-clip --workdir {workdir} --weights {weights} --step {step}`.

| | |
|---|---|
{table}

## Use

```python
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

model = CLIPModel.from_pretrained("OUT").eval()
processor = CLIPImageProcessor.from_pretrained("OUT")
pixels = processor(images=Image.open("cat.png"), return_tensors="pt")["pixel_values"]
with torch.no_grad():
    out = model.get_image_features(pixel_values=pixels)
image_features = out if torch.is_tensor(out) else out.pooler_output  # transformers 5: an output object
```

`preprocessor_config.json` prepares images as mmjax's evaluation did: RGB, resized to
{size}x{size} (bilinear, antialiased; no center crop), scaled to [0, 1], then normalised
with mean {preprocessor['image_mean']} and std {preprocessor['image_std']}. PIL's resize
differs from mmjax's (TensorFlow's) by about 1/255 of the pixel range.

## Text

{text}

## Training config

The workdir's `config.json` (the mmjax recipe with its run-time values):

<details>

```json
{config.to_json_best_effort(indent=2, sort_keys=True)}
```

</details>
"""
