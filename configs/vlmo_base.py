"""VLMo-base as in the paper (MODELS.md): one 12-layer multiway transformer of
ViT-B/16 width (768, 12 heads, MLP 3072) shared by images and text, VL experts in
the top two layers (from layer 10), 256px images, 40-token texts, BERT's 30,522-piece
vocabulary, bf16; the image-text stage (ITC + ITM with global hard negatives + MLM).

The shapes of the performance figures (`mmjax bench`, `mmjax train --dry-run`); for
real pretraining point `data` at an image-text set and a tokenizer of that size:

    mmjax bench --config configs/vlmo_base.py --batch-size 256
"""

import os

from mmjax import config as config_lib

VLMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vlmo.py")


def get_config(arg=None):
    c = config_lib.recipe(VLMO, arg)
    c.data.image_size = 256
    c.data.text_len = 40
    c.data.cache_decoded = False
    c.data.augment.crop_scale = (0.5, 1.0)
    c.data.augment.aspect = (3 / 4, 4 / 3)
    c.data.tokenizer.vocab_size = 30522
    m = c.model
    m.image = "B/16"
    m.image_overrides = {}
    m.vl_from = 10  # VLMo-base: VL-FFN in layers 10-11 of 12 (and configs/vlmo.py's VL-FFN ITC over them)
    m.embed_dim = 768
    m.tasks = ("itc", "itm", "mlm")
    m.dtype = "bfloat16"
    c.train.stages = None  # the image-text stage only (stage 3, what the figures time)
    t = c.train
    t.batch_size = 1024
    t.lr = 2e-4
    t.weight_decay = 0.01
    t.warmup_steps = 2500
    t.steps = 200_000
    c.eval.every = 5000
    return c
