"""CoCa-Base (MODELS.md, CoCa; Yu et al. 2022, table 1): a ViT-B image encoder, a
768-wide text decoder of 12 unimodal + 12 multimodal layers, attentional pooling
with 1 query for the contrastive embedding and 256 for captioning, loss 1 x ITC +
2 x LM with label smoothing 0.1 on the captions, bf16.

The paper's ViT-B/18 at 288px keeps its 16 x 16 patch grid here as B/16 at 256px
(the same tokens and FLOPs per image, mmjax's patch sizes being the usual ones);
its 64k sentencepiece vocabulary and 64-token texts are kept. The paper trains with
Adafactor at batch 65,536 for 500k steps; this recipe keeps mmjax's AdamW, with
the batch and steps to be set for the hardware at hand. For real pretraining point
`data` at an image-text set:

    mmjax train --config configs/coca_base.py --workdir DIR --dry-run --config.parallel.mesh.fsdp=8
"""

import os

from mmjax import config as config_lib

COCA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "coca.py")


def get_config(arg=None):
    c = config_lib.recipe(COCA, arg)
    c.data.image_size = 256
    c.data.text_len = 64
    c.data.cache_decoded = False
    c.data.augment.crop_scale = (0.5, 1.0)
    c.data.augment.aspect = (3 / 4, 4 / 3)
    c.data.tokenizer.vocab_size = 64000
    m = c.model
    m.image, m.text = "B/16", "B"
    m.image_overrides = {}
    m.text_overrides = dict(width=768, depth=24, heads=12, mlp_dim=3072)
    m.unimodal_layers = 12
    m.cap_queries = 256
    m.embed_dim = 768
    m.con_weight, m.cap_weight = 1.0, 2.0
    m.label_smoothing = 0.1
    m.dtype = "bfloat16"
    t = c.train
    t.batch_size = 4096
    t.lr = 5e-4
    t.weight_decay = 0.01
    t.warmup_steps = 2000
    t.steps = 200_000
    c.eval.every = 5000
    return c
