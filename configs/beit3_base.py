"""BEiT-3 base as released (MODELS.md; torchscale's `beit3_base_patch16_224`): one
12-layer multiway transformer of ViT-B/16 width (768, 12 heads, MLP 3072) in the
"decoupled" layout (per-modality q/k/v, output projections, norms and FFNs; only the
attention computation over the joint [image ; text] sequence is shared), 224px
images in 16px patches, the 64,010-piece sentencepiece vocabulary, 64-token texts,
bf16; pretrained with masked data modeling only (50% of a pair's text, 15% of text
alone, block-wise 40% of image patches; pixels regressed in place of BEiT-v2 tokens).

Parameters: 222,492,173 in mmjax's layout (tests/test_audit_models.py derives the
count term by term). unilm's README lists 276M for the released checkpoint; the
twelve decoupled layers and the embeddings come to about mmjax's count, the rest is
in parts mmjax does not build (torchscale's sub-LayerNorms and position tables, the
pretraining heads); not checked against the checkpoint, which is not available here.

The shapes of the performance figures (`mmjax bench`, `mmjax train --dry-run`); for
real pretraining point `data` at image, text and image-text sets and a tokenizer of
that size:

    mmjax bench --config configs/beit3_base.py --batch-size 256
"""

import os

from mmjax import config as config_lib

BEIT3 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "beit3.py")


def get_config(arg=None):
    c = config_lib.recipe(BEIT3, arg)
    c.data.image_size = 224
    c.data.text_len = 64
    c.data.cache_decoded = False
    c.data.augment.crop_scale = (0.5, 1.0)
    c.data.augment.aspect = (3 / 4, 4 / 3)
    c.data.tokenizer.vocab_size = 64010
    m = c.model
    m.image = "B/16"  # one tower for images, text and pairs: 768 wide, 12 layers, 12 heads, MLP 3072
    m.image_overrides = {}
    m.embed_dim = 768
    m.tasks = ("mlm", "tmlm", "mdm")
    m.dtype = "bfloat16"
    # The BEiT-3 paper's optimisation (AdamW b2 0.98, eps 1e-6, wd 0.05, cosine, 10k
    # warmup); its batch is 6,144 (2,048 images + 2,048 texts + 2,048 pairs) for 1M steps.
    t = c.train
    t.batch_size = 2048
    t.lr = 2e-3
    t.b2 = 0.98
    t.eps = 1e-6
    t.weight_decay = 0.05
    t.warmup_steps = 10_000
    t.steps = 1_000_000
    c.eval.every = 10_000
    return c
