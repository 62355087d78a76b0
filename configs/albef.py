"""ALBEF on the built-in data: ITC with momentum distillation + ITM + MLM.

A tiny ALBEF with the CLIP demo's image tower and step count, so the two can be
set side by side (docs/benchmarks.md):

    mmjax train --config configs/albef.py --workdir workdirs/albef

`configs/albef.py:emoji` runs it on the Twemoji pairs. The eval reports ITC-only
recall (i2t_r@k) and ITM-re-ranked recall (i2t_itm_r@k, top eval.rerank_k).
ALBEF's paper values (MODELS.md) are in the comments; the tiny model needs a
higher learning rate and a shorter queue and alpha ramp than ViT-B on 14M pairs.
"""

import os

from mmjax import config as config_lib

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config(arg=None):
    c = config_lib.recipe(DEMO, arg)  # the demo's data, towers and schedule
    m = c.model
    m.family = "albef"
    m.pool = "cls"  # the fused [CLS] and the ITC feature come from [CLS] tokens
    m.text_overrides = dict(width=96, depth=4, heads=4, mlp_dim=384)
    m.fusion_from = 2  # text layers 0-1 text only, 2-3 cross-attend to the image (ALBEF: 6 of 12)
    m.hard_negatives = 0
    m.queue_size = 4096  # ALBEF: 65,536 at batch 512; any size works (not a batch multiple)
    # ALBEF: 0.995 over 30 epochs of 14M pairs. Over 1,000 steps that teacher lags
    # ~200 steps behind a fast-moving student; 0.99 halves the lag.
    m.momentum = 0.99
    m.momentum_final = None  # or e.g. 1.0 for a cosine ramp of the momentum
    m.alpha = 0.4  # ALBEF
    m.alpha_ramp_steps = 100  # ALBEF ramps over the first epoch
    m.mlm_prob = 0.15  # ALBEF
    # ALBEF clamps the learned temperature to [0.001, 0.5] and trains at lr 1e-4. At
    # this recipe's lr 3e-3 the raw temperature fell from 0.07 to 0.006 (logit scale
    # 166) within 300 steps and ITC learned poorly (R@1 0.11 at step 500, measured);
    # CLIP's clamp (logit scale <= 100) keeps it at 0.01 or above.
    m.temp_range = (0.01, 0.5)
    m.tasks = ("itc", "itm", "mlm")
    c.eval.rerank_k = 16  # ALBEF: 128 or 256 on COCO/Flickr; the shapes test set has 479 captions
    return c
