"""VLMo: one multiway transformer (shared attention, V/L/VL experts), pretrained
stage-wise as in the paper, on the built-in data:

    mmjax train --config configs/vlmo.py --workdir workdirs/vlmo

Stages (train.stages; each ends at `until`):
  1. image      image-only masked data modeling trains attention + V-FFN
                (BEiT-style; mmjax regresses normalised pixels of 40% block-masked patches)
  2. text       text-only MLM trains L-FFN and text embeddings, attention and V-FFN frozen
  3. image-text ITC + ITM (hard negatives over the global batch) + MLM train everything
Loss weights as VLMo's release (vlmo/modules/objectives.py): the image-text MLM x 0.25
(model.mlm_weight) and ITC = (itc + itc_vlffn) / 2, the second ITC on the VL-FFN
features of the image-only and text-only passes with its own projections and logit
scale (model.itc_vlffn; False = one ITC, mmjax's earlier objective).
`configs/vlmo.py:emoji` runs it on the Twemoji pairs.
"""

import os

from mmjax import config as config_lib

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


# Param-path regexes (see mmjax/models/multiway.py and zoo/multiway.py for the names).
TEXT_PARTS = (r"^word_embed/", r"_text/", r"^mlm_head/")
IMAGE_PARTS = (r"^patch_embed/", r"^image_(cls|pos)$", r"_image/", r"^mask_token$", r"^mdm_head/")
SHARED_ATTENTION = (r"^encoder/block\d+/(ln1|attn)/",)
PAIR_PARTS = (r"_vl/", r"^(vl_)?(image_proj|text_proj)/|^itm_head/", r"^t(_vl)?$")


def get_config(arg=None):
    c = config_lib.recipe(DEMO, arg)  # the demo's data, towers and schedule
    m = c.model
    m.family = "vlmo"
    m.image_overrides = dict(width=96, depth=4, heads=4, mlp_dim=384)  # one tower for both
    m.text_overrides = {}
    m.vl_from = 3  # the top layer gets the VL expert (VLMo-base: layers 10-11 of 12)
    m.tasks = ("itc", "itm", "mlm")  # the default when no stage names its tasks
    m.mlm_prob = 0.15
    m.mlm_weight = 0.25  # VLMo's release weights the image-text MLM by 0.25 (1.0: the plain sum)
    m.itc_vlffn = True  # VLMo's release: + an ITC on VL-FFN features, (itc + itc_vlffn) / 2
    m.tmlm_prob = 0.15
    m.mdm_ratio = 0.4
    # `until` as a fraction of train.steps: 20% image, 20% text, 60% image-text.
    c.train.stages = [
        dict(name="image", until=0.2, tasks=("mdm",), freeze=TEXT_PARTS + PAIR_PARTS),
        dict(name="text", until=0.4, tasks=("tmlm",), freeze=SHARED_ATTENTION + IMAGE_PARTS + PAIR_PARTS),
        dict(name="image-text", until=1.0, tasks=("itc", "itm", "mlm"), freeze=(r"^mask_token$", r"^mdm_head/")),
    ]
    c.eval.rerank_k = 16
    return c
