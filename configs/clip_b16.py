"""CLIP ViT-B/16 at OpenAI's shapes: 224px, 77-token texts, vocab 49,408, embed 512
(149.6M params), bf16 compute, batch 256.

The shapes of the scale-out and performance figures (docs/benchmarks.md,
docs/scaling.md). For real pretraining point `data` at an image-text set and a
sentencepiece model of that vocabulary size; the built-in data is too small for it:

    mmjax train --config configs/clip_b16.py --workdir DIR --dry-run \\
        --config.parallel.mesh.fsdp=8        # bytes per device, nothing trained
    mmjax bench --config configs/clip_b16.py  # step time on synthetic batches
"""

import os

from mmjax import config as config_lib

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config(arg=None):
    c = config_lib.recipe(DEMO, arg)
    c.data.image_size = 224
    c.data.text_len = 77
    c.data.cache_decoded = False
    c.data.augment.crop_scale = (0.9, 1.0)  # OpenCLIP's RandomResizedCrop default scale
    c.data.augment.aspect = (3 / 4, 4 / 3)
    c.data.tokenizer.vocab_size = 49408
    m = c.model
    m.image, m.text = "B/16", "B"
    m.image_overrides, m.text_overrides = {}, {}
    m.embed_dim = 512
    m.pool = "cls"
    m.dtype = "bfloat16"
    t = c.train
    t.batch_size = 256
    t.lr = 5e-4
    t.warmup_steps = 2000
    t.steps = 100_000
    t.weight_decay = 0.2
    c.eval.every = 5000
    return c
