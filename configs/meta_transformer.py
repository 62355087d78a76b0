"""Meta-Transformer on the built-in data: per-modality tokenizers into the demo CLIP's
image blocks, frozen, with a linear head per modality.

    mmjax train --config configs/demo.py --workdir workdirs/demo                     # the encoder
    mmjax train --config configs/meta_transformer.py --workdir workdirs/meta          # frozen (the paper)
    mmjax train --config configs/meta_transformer.py:tuned --workdir workdirs/meta_tuned
    mmjax train --config configs/meta_transformer.py:scratch --workdir workdirs/meta_scratch

Sounds and depth maps of `shapes_av` (configs/imagebind.py) are classified into the
24 classes of `shapes` (the colour and shape of the first-named object). `frozen`:
the demo CLIP's image-tower blocks (finetune.init_parts, `train.freeze`) shared by
both modalities, only the tokenizers (patches, [CLS], positions, ln_pre) and heads
train; `tuned`: the same, the blocks trained too; `scratch`: each modality its own
blocks of the same size, from random init: what the frozen encoder is measured
against at the same budget.
"""

import os

import ml_collections

from mmjax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = ("frozen", "tuned", "scratch")


def get_config(arg=None):
    arg = arg or "frozen"
    if arg not in ARGS:
        raise ValueError(f"configs/meta_transformer.py argument {arg!r}; valid choices: {', '.join(ARGS)}")
    c = config_lib.recipe(os.path.join(HERE, "imagebind.py"))
    demo = config_lib.recipe(os.path.join(HERE, "demo.py")).model
    c.data.modalities = ("audio", "depth")
    c.model = m = ml_collections.ConfigDict()
    m.family = "meta_transformer"
    for k in ("image", "image_overrides", "act", "ln_eps"):  # the encoder: the CLIP image tower's blocks
        m[k] = demo[k].to_dict() if hasattr(demo[k], "to_dict") else demo[k]
    m.modalities = ("audio", "depth")
    m.audio = dict(patch=8, n_fft=256, hop=64, n_mels=32, mean=-4.7, std=3.1)
    m.depth = dict(patch=8)
    m.num_classes = 24  # shapes_gen.CLASS_NAMES
    m.encoder = "separate" if arg == "scratch" else "shared"
    m.dtype, m.param_dtype, m.remat, m.attention = "float32", "float32", "none", "xla"
    c.finetune = ml_collections.ConfigDict()
    c.finetune.init_from = None
    c.finetune.init_parts = {} if arg == "scratch" else {"encoder": "workdirs/demo:image_tower/encoder"}
    c.finetune.weights = "student"
    c.train.freeze = ("^encoder/",) if arg == "frozen" else ()
    c.train.lr = 1e-3
    return c
