"""BEiT-3: a multiway transformer in the released "decoupled" layout (per-modality
q/k/v, output projections, norms and FFNs; only the attention computation shared),
pretrained with one objective, masked data modeling, on text, images and pairs:

    mmjax train --config configs/beit3.py --workdir workdirs/beit3

  mlm   50% of the text of an image-text pair masked, predicted from [image ; text]
  tmlm  15% of text masked, text alone
  mdm   block-wise 40% of image patches masked; mmjax regresses normalised pixels
        (the usual stand-in when no BEiT-v2 visual tokenizer is available)
Masked data modeling alone trains no ITC projection, so the retrieval numbers its
eval prints stay near chance until the model is fine-tuned for retrieval; add
"itc" / "itm" to model.tasks to pretrain them too.
"""

import os

from mmjax import config as config_lib

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config(arg=None):
    c = config_lib.recipe(DEMO, arg)  # the demo's data, towers and schedule
    m = c.model
    m.family = "beit3"
    m.image_overrides = dict(width=96, depth=4, heads=4, mlp_dim=384)
    m.text_overrides = {}
    m.tasks = ("mlm", "tmlm", "mdm")
    m.mlm_prob = 0.5  # text of image-text pairs (BEiT-3)
    m.mlm_weight = 1.0  # BEiT-3: one masked-data-modeling objective, unweighted (VLMo's release: 0.25)
    m.tmlm_prob = 0.15  # text alone (BEiT-3)
    m.mdm_ratio = 0.4  # block-wise image masking (BEiT-3)
    c.eval.rerank_k = 16
    return c
