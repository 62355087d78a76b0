"""CoCa on the built-in data: a contrastive image-text model that also captions.

    mmjax train --config configs/coca.py --workdir workdirs/coca

The demo's data, image tower and schedule; the text side is one 4-layer decoder
(width 96) whose lower 2 layers are unimodal (their [CLS] gives the ITC embedding)
and whose upper 2 cross-attend to 16 attentionally pooled image tokens and caption.
Loss = 1 x ITC + 2 x LM (CoCa's weights). The eval reports retrieval from the
contrastive head (captioning metrics: not yet).
"""

import os

from mmjax import config as config_lib

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config(arg=None):
    c = config_lib.recipe(DEMO, arg)
    m = c.model
    m.family = "coca"
    m.text_overrides = dict(width=96, depth=4, heads=4, mlp_dim=384)
    m.unimodal_layers = 2
    m.cap_queries = 16
    m.con_weight = 1.0
    m.cap_weight = 2.0  # CoCa
    m.label_smoothing = 0.0
    m.hard_negatives = 0
    return c
