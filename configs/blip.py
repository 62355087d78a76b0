"""BLIP on the built-in data: ITC with momentum distillation + ITM + captioning LM.

    mmjax train --config configs/blip.py --workdir workdirs/blip

The demo's data, image tower and schedule; the text side is one 4-layer
transformer (width 96) run three ways: unimodal encoder (its <cls> gives the ITC
embedding), image-grounded encoder (ITM, cross-attention to every image token in
every block) and image-grounded decoder (captioning), the two grounded modes
sharing every param but their self-attention. Loss = ITC + ITM + LM (BLIP's
unweighted sum, LM label smoothing 0.1). The eval reports ITC recall (i2t_r@k),
ITM-re-ranked recall (i2t_itm_r@k, top eval.rerank_k) and greedy-caption metrics.
BLIP's values (MODELS.md, configs/blip_base.py) are in the comments; the tiny model
takes ALBEF's tiny-recipe choices (higher lr, shorter queue and alpha ramp).
"""

import os

from mmjax import config as config_lib

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config(arg=None):
    c = config_lib.recipe(DEMO, arg)  # the demo's data, towers and schedule
    m = c.model
    m.family = "blip"
    m.pool = "cls"  # BLIP's ITC image feature is the ViT [CLS]
    m.text_overrides = dict(width=96, depth=4, heads=4, mlp_dim=384)
    m.hard_negatives = 0
    m.queue_size = 4096  # BLIP: 57,600
    m.momentum = 0.99  # BLIP: 0.995 (see configs/albef.py for the short-run lag)
    m.momentum_final = None
    m.alpha = 0.4  # BLIP
    m.alpha_ramp_steps = 100  # BLIP ramps over the first epoch
    m.temp_range = (0.01, 0.5)  # BLIP: (0.001, 0.5); the tiny model's lr needs CLIP's clamp (configs/albef.py)
    m.tasks = ("itc", "itm", "lm")
    m.itc_weight = 1.0
    m.itm_weight = 1.0
    m.lm_weight = 1.0
    m.label_smoothing = 0.1  # BLIP
    c.eval.rerank_k = 16  # BLIP: k = 256 (COCO) / 128 (Flickr); the shapes test set has 479 captions
    return c
