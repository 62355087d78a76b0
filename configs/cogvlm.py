"""A CogVLM-style connector on the built-in data: configs/llava.py's parts (the demo
CLIP's image tower, a projector, the tiny LM of configs/lm.py) with a visual expert in
every LM layer: image tokens use their own q/k/v/o and MLP weights (initialised as
copies of the LM's), all image tokens share one RoPE position, and the LM's own
weights stay frozen while the experts and the projector train.

    mmjax train --config configs/cogvlm.py --workdir workdirs/cogvlm

One stage of 1,000 steps on the same conversations as configs/llava.py's stage 2
(the step budget of LLaVA's stages 1 + 2). The eval generates each test question's
answer and reports exact-match accuracy per answer type.
"""

import os

from mmjax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))

EXPERT_ONLY = r"^lm/(?!.*_img/)"  # every LM param but the visual experts


def get_config(arg=None):
    del arg
    c = config_lib.recipe(os.path.join(HERE, "llava.py"), "stage1")  # its data, parts and init_parts
    c.model.family = "cogvlm"
    c.data.chat.task = "vqa_multi"
    c.data.chat.template = "vicuna"
    c.eval.at_end = True
    c.train.freeze = ("^vision/", EXPERT_ONLY)
    c.train.steps = 1000
    c.train.warmup_steps = 30  # 3%
    c.train.lr = 1e-3
    return c
