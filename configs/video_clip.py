"""Video CLIP on the built-in `moving_shapes` clips (captions that need the time axis).

    mmjax train --config configs/video_clip.py:divided --workdir workdirs/video_clip

The argument picks the vision tower's temporal modeling (models/video.py TEMPORAL):
'none' (frame tokens attend jointly), 'divided' (TimeSformer space-time attention,
the default), 'local' (mPLUG-2's local temporal module; `model.local_temporal`:
'release', mPLUG-2's, or 'mmjax_v1', mmjax's first version, docs/models.md) or 'mean'
(no temporal modeling: frames encoded alone and averaged, the order-blind baseline).
The demo's
towers and optimizer; 4 of each clip's 8 frames (a random frame per segment in
training, the segment centres in eval). The eval reports video->text retrieval
(i2t_r@k; the 'image' of a batch is the clip) and the time probe: the clip scored
against its own caption and the caption of the same clip played backwards.

An image-text checkpoint continues on video: `mmjax finetune --config
configs/video_clip.py --init-from IMAGE_WORKDIR` loads every image param (the new
temporal embedding and temporal layers start as the identity; docs/models.md).
"""

import os

import ml_collections

from mmjax import config as config_lib

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
TEMPORAL = ("none", "divided", "local", "mean")


def get_config(arg=None):
    temporal = arg or "divided"
    if temporal not in TEMPORAL:
        raise ValueError(f"configs/video_clip.py argument {temporal!r}; valid choices: {', '.join(TEMPORAL)}")
    c = config_lib.recipe(DEMO)
    d = c.data
    d.name = "moving_shapes"
    d.num_frames = 4  # frames per clip fed to the model (of the 8 stored)
    d.frame_sampling = "random"  # training: a random frame of each of 4 segments (TSN); eval: their centres
    d.text_len = 16  # the longest caption is 15 tokens with bos/eos (128-piece tokenizer)
    c.model.temporal = temporal  # model.tubelet > 1: ViViT tubelets (demo.py lists the video keys)
    c.model.local_temporal = "release"  # temporal 'local': mPLUG-2's module, or "mmjax_v1"
    # NegCLIP-style: each clip's candidates include the captions of the same events in
    # another order (the clip played backwards first; the events swapped, and that
    # reversed). A batch of random captions rarely asks for the order: retrieval is
    # mostly solved by the objects and their actions. Measured (docs/benchmarks.md):
    # without them joint attention reached R@1 0.85 with the time probe at chance,
    # and with one negative drawn at random it learned the swaps (solvable from how
    # many frames show each state) but not the reversal.
    c.model.hard_negatives = 3
    # `mmjax finetune --init-from IMAGE_WORKDIR`: the student or EMA weights, and how an
    # image patch kernel becomes a tubelet kernel (model.tubelet > 1): "central" or "mean".
    c.finetune = ml_collections.ConfigDict({"init_from": None, "weights": "student", "inflation": "central"})
    c.train.batch_size = 128
    c.train.steps = 1000
    c.train.ckpt_every = 500
    c.eval.every = 250
    c.eval.batch_size = 128
    return c
