"""Image-text retrieval fine-tuning from a pretraining checkpoint (CLIP or ALBEF).

    mmjax finetune --config configs/finetune_retrieval.py:albef --init-from workdirs/albef --workdir workdirs/albef_ret
    mmjax finetune --config configs/finetune_retrieval.py:clip --init-from workdirs/demo --workdir workdirs/clip_ret

The pretraining recipe with its retrieval objectives only (ALBEF's fine-tuning
drops MLM and keeps ITC with distillation + ITM; CLIP keeps ITC), a tenth of the
learning rate, a short warm-up and 300 steps. Point `data` at the target image-text
set; the model section must match the checkpoint (it is the pretraining recipe's).
"""

import os

import ml_collections

from mmjax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    arg = arg or "clip"
    if arg not in ("clip", "albef"):
        raise ValueError(f"configs/finetune_retrieval.py argument {arg!r}; valid choices: clip, albef")
    c = config_lib.recipe(os.path.join(HERE, "demo.py" if arg == "clip" else "albef.py"))
    if arg == "albef":
        c.model.tasks = ("itc", "itm")
        c.model.alpha_ramp_steps = 0  # the teacher is already trained
    c.finetune = ml_collections.ConfigDict({"init_from": None, "weights": "student"})
    c.train.lr = c.train.lr / 10
    c.train.warmup_steps = 20
    c.train.steps = 300
    c.eval.every = 0
    return c
