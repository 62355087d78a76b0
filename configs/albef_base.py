"""ALBEF-base as in the paper (MODELS.md): ViT-B/16 at 256px, a 12-layer BERT-base
text encoder split at layer 6, 256-d projections, 65,536-slot queues, momentum
0.995, lr 1e-4, wd 0.02, 25-token texts, BERT's 30,522-piece vocabulary, bf16.

The shapes of the scale-out and performance figures; for real pretraining point
`data` at an image-text set and a tokenizer of that vocabulary size:

    mmjax train --config configs/albef_base.py --workdir DIR --dry-run --config.parallel.mesh.fsdp=8
"""

import os

from mmjax import config as config_lib

ALBEF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "albef.py")


def get_config(arg=None):
    c = config_lib.recipe(ALBEF, arg)
    c.data.image_size = 256
    c.data.text_len = 25
    c.data.cache_decoded = False
    c.data.augment.crop_scale = (0.5, 1.0)  # ALBEF: RandomResizedCrop(256, scale=(0.5, 1))
    c.data.augment.aspect = (3 / 4, 4 / 3)
    c.data.tokenizer.vocab_size = 30522
    m = c.model
    m.image, m.text = "B/16", "B"
    m.image_overrides = {}
    m.text_overrides = dict(width=768, depth=12, heads=12, mlp_dim=3072)  # BERT-base
    m.fusion_from = 6
    m.embed_dim = 256
    m.queue_size = 65536
    m.momentum = 0.995
    m.alpha_ramp_steps = 2000
    m.temp_range = (0.001, 0.5)
    m.dtype = "bfloat16"
    t = c.train
    t.batch_size = 512
    t.lr = 1e-4
    t.weight_decay = 0.02
    t.warmup_steps = 1000
    t.steps = 100_000
    c.eval.every = 5000
    return c
