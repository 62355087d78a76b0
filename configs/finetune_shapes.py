"""Image classification on the built-in `shapes` labels (24 classes: the colour and
shape of the first-named object), from a pretraining checkpoint or from scratch.

    mmjax train --config configs/demo.py --workdir workdirs/demo             # pretrain
    mmjax finetune --config configs/finetune_shapes.py:linear --init-from workdirs/demo --workdir workdirs/probe
    mmjax finetune --config configs/finetune_shapes.py:full --init-from workdirs/demo --workdir workdirs/ft
    mmjax train --config configs/finetune_shapes.py:full --workdir workdirs/scratch   # random init

`linear`: a linear probe (the backbone frozen, only the head trains). `full`: every
param trains, with layer-wise lr decay 0.75. `--init-from` takes a workdir (latest
checkpoint) or WORKDIR/checkpoints/STEP, `--weights ema` the EMA teacher of an
ALBEF-style run; the backbone's architecture is the checkpoint's. Without it the
backbone is the demo's CLIP, randomly initialised. A different data.image_size
resizes the position embeddings.
"""

import os

import ml_collections

from mmjax import config as config_lib

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config(arg=None):
    arg = arg or "linear"
    if arg not in ("linear", "full"):
        raise ValueError(f"configs/finetune_shapes.py argument {arg!r}; valid choices: linear, full")
    c = config_lib.recipe(DEMO)
    backbone = c.model.to_dict()
    c.model = ml_collections.ConfigDict()
    c.model.family = "classifier"
    c.model.backbone = backbone  # replaced by the checkpoint's model with --init-from
    c.model.num_classes = 24
    c.model.feature_scale = 10.0
    c.finetune = ml_collections.ConfigDict()
    c.finetune.init_from = None
    c.finetune.weights = "student"
    t = c.train
    t.steps = 300
    t.warmup_steps = 20
    if arg == "linear":
        t.lr = 1e-2
        t.weight_decay = 0.0
        t.freeze = ("^backbone/",)
    else:
        t.lr = 1e-3
        t.layer_decay = 0.75
    c.eval.every = 0
    c.eval.at_end = True
    return c
