"""MiniGPT-4 on the built-in data: a BLIP-2 stage-1 vision tower and Q-Former, frozen,
one linear layer into the frozen tiny LM: only that layer trains, in two stages, with
MiniGPT-4's conversation template ("###Human: ... ###Assistant: ...###").

    mmjax train --config configs/minigpt4.py:stage1 --workdir workdirs/minigpt4_1  # captions
    mmjax train --config configs/minigpt4.py:stage2 --workdir workdirs/minigpt4_2 \\
        --config.finetune.init_from=workdirs/minigpt4_1                          # conversations

Stage 1 (MiniGPT-4's pretraining on image-caption pairs): the caption prompts of the
`shapes_vqa` scenes; stage 2 (its fine-tuning on aligned descriptions, here the same
question-answer and caption conversations as configs/blip2.py:stage2). The parts come
from workdirs/blip2 (configs/blip2.py) and workdirs/lm. The stages' steps add up to
blip2.py:stage2's 1,000, so the connectors compare at one budget. MiniGPT-4's values
(stage 1: 20k steps, batch 256, lr 1e-4; stage 2: 400 steps, batch 12, lr 3e-5) are
the 7B release's.
"""

import os

from mmjax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("stage1", "stage2")
FROZEN = ("^vision/", "^ln_vision/", "^qformer/", "^lm/")  # only the projection trains


def get_config(arg=None):
    arg = arg or "stage1"
    if arg not in STAGES:
        raise ValueError(f"configs/minigpt4.py argument {arg!r}; valid choices: {', '.join(STAGES)}")
    c = config_lib.recipe(os.path.join(HERE, "blip2.py"), "stage2")
    c.model.family = "minigpt4"
    c.data.chat.template = "minigpt4"
    c.data.chat.system = ""  # its system prompt is long for the tiny recipes' 56 tokens
    c.train.freeze = FROZEN
    if arg == "stage1":
        c.data.chat.task = "caption"
        c.train.steps = 300
        c.train.warmup_steps = 9
        c.train.lr = 2e-3
        c.eval.at_end = False
        return c
    c.finetune.init_parts = None
    c.finetune.init_from = "workdirs/minigpt4_1"
    c.data.chat.task = "caption_vqa"
    c.train.steps = 700
    c.train.warmup_steps = 21
    c.train.lr = 1e-3
    return c
