"""CLIP ViT-S/16 at 64 px: open_clip's ViT-S-16 towers (12 x 384, 6 heads, both
towers; embed 384; vocab 49,408) on 64 px images and 16-token texts, fp32, batch 128.

The second size of the CPU side by side against open_clip (launch/cpu_side_by_side.py,
docs/benchmarks.md): big enough that matmuls and the optimizer over 62M params
dominate, small enough for a 2-core CPU (a few seconds a step). Exact GELU, as
open_clip's `nn.GELU()`, so both sides compute the same function:

    mmjax bench --config configs/clip_s16_64.py --steps 10
"""

import os

from mmjax import config as config_lib

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config(arg=None):
    c = config_lib.recipe(DEMO, arg)
    c.data.image_size = 64
    c.data.text_len = 16
    c.data.cache_decoded = False
    c.data.tokenizer.vocab_size = 49408
    m = c.model
    m.image, m.text = "S/16", "S"
    m.image_overrides, m.text_overrides = {}, {}
    m.embed_dim = 384
    m.act = "gelu"
    m.ln_eps = 1e-5
    c.train.batch_size = 128
    c.train.lr = 5e-4
    c.train.weight_decay = 0.2
    return c
