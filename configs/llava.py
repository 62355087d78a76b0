"""LLaVA-style connectors on the built-in data: the demo CLIP's image tower, a
projector, and the tiny LM of configs/lm.py, trained on `shapes_vqa` conversations
(vicuna turns, loss on the answers only).

    mmjax train --config configs/demo.py --workdir workdirs/demo            # the vision tower (CLIP)
    mmjax train --config configs/lm.py --workdir workdirs/lm                # the LM
    mmjax train --config configs/llava.py:stage1 --workdir workdirs/llava1  # projector on captions
    mmjax train --config configs/llava.py:stage2 --workdir workdirs/llava2 \\
        --config.finetune.init_from=workdirs/llava1                         # projector + LM on questions
    mmjax train --config configs/llava.py:lora --workdir workdirs/llava_lora \\
        --config.finetune.init_from=workdirs/llava1                         # projector + LoRA on the LM

Stage 1 (LLaVA's feature alignment): the image, then its caption (the 'plain' template),
only the projector trains (vision tower and LM frozen), its parts loaded by
finetune.init_parts (the CLIP's `image_tower` into `vision`, the LM workdir into `lm`). Stage 2 (visual
instruction tuning): single- and two-turn questions about the scene, projector + LM
train (vision frozen); `lora` trains the projector and rank-8 LoRA adapters on the
frozen LM instead. As LLaVA-1.5: cosine schedule, 3% warmup, no weight decay; the
learning rates are the tiny models' (2e-3, 1e-3), not the 7B release's (1e-3, 2e-5). The
eval generates the answer to each test question (greedy) and
reports exact-match accuracy per answer type (the test images were never trained on).
"""

import os

import ml_collections

from mmjax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("stage1", "stage2", "lora")
LORA_FROZEN = r"^lm/(?!.*_lora/)"  # every LM param but the LoRA adapters


def base(family: str = "llava"):
    """The data, vision tower (as configs/demo.py's CLIP) and LM (as configs/lm.py's) of the connector recipes."""
    c = config_lib.recipe(os.path.join(HERE, "lm.py"))
    demo = config_lib.recipe(os.path.join(HERE, "demo.py")).model
    lm = c.model.lm.to_dict()
    c.model = ml_collections.ConfigDict()
    c.model.family = family
    c.model.image = demo.image
    c.model.image_overrides = demo.image_overrides.to_dict()
    c.model.pool, c.model.posemb, c.model.act, c.model.ln_eps = demo.pool, demo.posemb, demo.act, demo.ln_eps
    c.model.lm = lm
    c.model.feature_layer = -2  # the penultimate block's tokens, [CLS] dropped (LLaVA-1.5)
    c.model.projector = "mlp2x_gelu"
    c.model.prefix_lm = False
    c.model.lora_rank = 0
    c.model.lora_alpha = 16.0
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.model.attention = "xla"
    c.model.scan_layers = False
    c.model.label_smoothing = 0.0
    c.data.text_len = 64  # 16 image tokens + two question-answer turns
    c.data.chat.task = "vqa_multi"
    c.finetune = ml_collections.ConfigDict()
    c.finetune.init_from = None
    c.finetune.init_parts = {"vision": "workdirs/demo:image_tower", "lm": "workdirs/lm"}
    c.finetune.weights = "student"
    c.train.batch_size = 64
    c.train.weight_decay = 0.0  # LLaVA: no weight decay
    c.eval.every = 0
    c.eval.at_end = True
    c.eval.held_out_phrasings = False  # True: the questions in phrasings never trained on
    return c


def get_config(arg=None):
    arg = arg or "stage1"
    if arg not in STAGES:
        raise ValueError(f"configs/llava.py argument {arg!r}; valid choices: {', '.join(STAGES)}")
    c = base()
    if arg == "stage1":
        c.data.chat.task = "caption"
        c.data.chat.template = "plain"  # LLaVA's stage 1: the image, then its caption
        c.train.freeze = ("^vision/", "^lm/")
        c.train.steps = 300
        c.train.warmup_steps = 9  # 3%
        c.train.lr = 2e-3
        c.eval.at_end = False  # a captioner: the question-answer eval starts with stage 2
        return c
    c.finetune.init_parts = None  # from the stage-1 workdir: --config.finetune.init_from=...
    c.finetune.init_from = "workdirs/llava1"
    c.train.steps = 700
    c.train.warmup_steps = 21  # 3%
    c.train.lr = 1e-3
    c.train.freeze = ("^vision/",)
    if arg == "lora":
        c.model.lora_rank = 8
        c.train.freeze = ("^vision/", LORA_FROZEN)
    return c
