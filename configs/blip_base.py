"""BLIP-base as pretrained in the paper (MODELS.md): ViT-B/16 at 224px, a BERT-base
sized text transformer (12 layers, width 768) whose image-grounded encoder and
decoder share all but their self-attention, 256-d projections, 57,600-slot queues,
momentum 0.995, alpha 0.4 ramped over the first epoch, label smoothing 0.1, 30-token
texts, BERT's 30,522-piece vocabulary, AdamW lr 3e-4 (3,000 warmup steps) and weight
decay 0.05 at batch 2,880 for 20 epochs of 14M images (~97k steps), bf16.

The shapes of the scale-out and performance figures; for real pretraining point
`data` at an image-text set and a tokenizer of that vocabulary size:

    mmjax train --config configs/blip_base.py --workdir DIR --dry-run --config.parallel.mesh.fsdp=8
"""

import os

from mmjax import config as config_lib

BLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blip.py")


def get_config(arg=None):
    c = config_lib.recipe(BLIP, arg)
    c.data.image_size = 224
    c.data.text_len = 30  # BLIP pretraining: max_length=30
    c.data.cache_decoded = False
    c.data.augment.crop_scale = (0.5, 1.0)  # BLIP: RandomResizedCrop(224, scale=(0.5, 1)), + flip, RandAugment
    c.data.augment.aspect = (3 / 4, 4 / 3)
    c.data.tokenizer.vocab_size = 30522
    m = c.model
    m.image, m.text = "B/16", "B"
    m.image_overrides = {}
    m.text_overrides = dict(width=768, depth=12, heads=12, mlp_dim=3072)  # BERT-base
    m.embed_dim = 256
    m.queue_size = 57600
    m.momentum = 0.995
    m.alpha = 0.4
    m.alpha_ramp_steps = 5000  # one epoch of 14M pairs at batch 2,880
    m.temp_range = (0.001, 0.5)
    m.label_smoothing = 0.1
    m.dtype = "bfloat16"
    t = c.train
    t.batch_size = 2880
    t.lr = 3e-4
    t.end_lr_factor = 0.05  # BLIP: 3e-4 x 0.85 per epoch, 1.4e-5 in epoch 20; here a cosine to 1.5e-5
    t.weight_decay = 0.05
    t.warmup_steps = 3000
    t.steps = 97_000
    c.eval.every = 5000
    c.eval.rerank_k = 128
    return c
