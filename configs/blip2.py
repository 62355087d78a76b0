"""BLIP-2 on the built-in data: a Q-Former learns to read the demo CLIP's frozen image
tower (stage 1), then feeds the tiny LM of configs/lm.py as a soft prefix (stage 2).

    mmjax train --config configs/demo.py --workdir workdirs/demo            # the image tower (CLIP)
    mmjax train --config configs/lm.py --workdir workdirs/lm                # the LM (and the tokenizer)
    mmjax train --config configs/blip2.py --workdir workdirs/blip2          # stage 1: ITC + ITM + ITG
    mmjax train --config configs/blip2.py:stage2 --workdir workdirs/blip2_lm  # stage 2: the LM's prefix

Stage 1 (representation learning): the CLIP's `image_tower` frozen (its penultimate
block's tokens, [CLS] kept, through a trainable `ln_vision`), a 4-layer Q-Former (width
96, 8 queries: BLIP-2's is BERT-base with 32) trained by ITC (max over queries), ITM
(hard negatives from the batch) and ITG (the multimodal causal mask), weights 1, label
smoothing 0.1, temperature clamped as the release. The text is tokenized with the LM's
tokenizer (finetune.tokenizer_from), so the Q-Former's word table is the LM's vocabulary
(InstructBLIP's instruction goes through both). The eval: ITC retrieval by the best
query, ITM re-ranking, the binding probe.

Stage 2 (generative learning): the stage-1 vision tower, `ln_vision` and Q-Former; one
linear layer into the LM's width; the LM frozen; the Q-Former's 8 query outputs fill
the image slots of `shapes_vqa` conversations (captions and questions alternating,
vicuna turns), loss on the answers. The eval generates each test question's answer
(exact match per answer type) and a caption of each test image (CIDEr).

BLIP-2's values (stage 1: lr 1e-4, cosine, 2k warmup, wd 0.05, batch 2320; stage 2: lr
1e-4, batch 1920) are the 1B-scale release's; the tiny models take the demo's and
configs/llava.py's learning rates.
"""

import os

import ml_collections

from mmjax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("stage1", "stage2")
VISION = ("image", "image_overrides", "pool", "posemb", "act", "ln_eps")


def qformer_keys(m) -> None:
    """The Q-Former of the tiny recipes (BLIP-2: BERT-base, 32 queries, cross-attention every 2nd block)."""
    m.qformer = "mu"
    m.qformer_overrides = dict(width=96, depth=4, heads=4, mlp_dim=384)
    m.num_query = 8
    m.cross_every = 2
    m.qformer_dtype = "float32"  # LAVIS's fp16 stage 1 gives an INF loss
    m.feature_layer = -2  # BLIP-2 drops the ViT's last block


def stage1():
    c = config_lib.recipe(os.path.join(HERE, "demo.py"))
    demo = c.model
    c.model = m = ml_collections.ConfigDict()
    m.family = "blip2"
    for k in VISION:
        m[k] = demo[k].to_dict() if hasattr(demo[k], "to_dict") else demo[k]
    qformer_keys(m)
    m.embed_dim = 96  # BLIP-2: 256
    m.temp_range = (0.01, 0.5)  # BLIP-2: (0.001, 0.5); the tiny lr needs CLIP's clamp (configs/albef.py)
    m.label_smoothing = 0.1
    m.itc_weight = m.itm_weight = m.itg_weight = 1.0
    m.tasks = ()
    m.dtype, m.param_dtype, m.remat, m.attention = "float32", "float32", "none", "xla"
    c.finetune = ml_collections.ConfigDict()
    c.finetune.init_from = None
    c.finetune.init_parts = {"vision": "workdirs/demo:image_tower"}
    c.finetune.tokenizer_from = "workdirs/lm"
    c.finetune.weights = "student"
    c.train.freeze = ("^vision/",)
    c.eval.rerank_k = 16
    return c


def stage2(family: str = "blip2_lm", stage1_workdir: str = "workdirs/blip2"):
    """configs/llava.py's data and LM with stage 1's vision and Q-Former in front."""
    c = config_lib.recipe(os.path.join(HERE, "llava.py"), "stage1")
    m = c.model
    m.family = family
    qformer_keys(m)
    m.projector = "linear"
    m.instruction_len = 0
    m.qformer_dtype = "float32"
    c.finetune.init_parts = {
        "vision": f"{stage1_workdir}:vision",
        "ln_vision": f"{stage1_workdir}:ln_vision",
        "qformer": f"{stage1_workdir}:qformer",
        "lm": "workdirs/lm",
    }
    c.data.text_len = 56  # 8 query slots + two question-answer turns
    c.data.chat.task = "caption_vqa"
    c.data.chat.template = "vicuna"
    c.train.freeze = ("^vision/", "^lm/")  # the Q-Former, ln_vision and the projection train
    c.train.steps = 1000
    c.train.warmup_steps = 30
    c.train.lr = 1e-3
    c.eval.at_end = True
    c.eval.captions = True
    return c


def get_config(arg=None):
    arg = arg or "stage1"
    if arg not in STAGES:
        raise ValueError(f"configs/blip2.py argument {arg!r}; valid choices: {', '.join(STAGES)}")
    return stage1() if arg == "stage1" else stage2()
