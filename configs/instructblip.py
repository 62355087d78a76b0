"""InstructBLIP on the built-in data: configs/blip2.py's stage 2 with the instruction in
the Q-Former too (its first 24 prompt tokens attend with the queries), trained on the
same conversations and budget.

    mmjax train --config configs/instructblip.py --workdir workdirs/instructblip

From a BLIP-2 stage-1 workdir (workdirs/blip2, trained with the LM's tokenizer) and the
tiny LM (workdirs/lm), LM and vision frozen. The eval generates answers to the test
questions (per answer type) and captions; with `--config.eval.held_out_phrasings=True`
the questions come in phrasings never trained on: zero-shot generalisation to unseen
instructions, against configs/blip2.py:stage2 under the same eval. InstructBLIP's
release has no training config; its paper's: lr 1e-5, batch 192, 60k steps (Vicuna-7B).
"""

import os

from mmjax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    del arg
    c = config_lib.recipe(os.path.join(HERE, "blip2.py"), "stage2")
    c.model.family = "instructblip"
    c.model.instruction_len = 24  # the vicuna prompt of a shapes question: ~12-20 tokens
    return c
