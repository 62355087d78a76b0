"""VQA-style answer classification over fused image-question features, on the
built-in `shapes_vqa` questions (the `shapes` images, one question each: the colour,
shape or size of an object, a relation yes/no, an existence yes/no; 14 answers).

    mmjax train --config configs/albef.py --workdir workdirs/albef                 # pretrain
    mmjax finetune --config configs/finetune_vqa.py --init-from workdirs/albef --workdir workdirs/vqa
    mmjax train --config configs/finetune_vqa.py --workdir workdirs/vqa_scratch    # random init

The backbone is the checkpoint's (ALBEF, VLMo or BEiT-3); without `--init-from` it is
the recipe named by the argument (`:albef` default, `:vlmo`, `:beit3`), randomly
initialised. Every param trains, the head at 10x the backbone's learning rate
(BEiT-3 uses 20x, VLMo 10x) and the backbone with layer-wise lr decay. Questions
use words the 128-piece pretraining tokenizer splits into letters, so the text
length is 40 (the longest question); text positions past the checkpoint's keep
their fresh init. The eval reports top-1 overall and per answer type.
"""

import os

import ml_collections

from mmjax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
BACKBONES = ("albef", "vlmo", "beit3")


def get_config(arg=None):
    arg = arg or "albef"
    if arg not in BACKBONES:
        raise ValueError(f"configs/finetune_vqa.py argument {arg!r}; valid choices: {', '.join(BACKBONES)}")
    c = config_lib.recipe(os.path.join(HERE, f"{arg}.py"))
    backbone = c.model.to_dict()
    c.model = ml_collections.ConfigDict()
    c.model.family = "vqa"
    c.model.backbone = backbone  # replaced by the checkpoint's model with --init-from
    c.model.num_answers = 14
    c.model.vqa_loss = "softmax"  # or "bce" (VLMo / BEiT-3 on VQAv2)
    c.data.name = "shapes_vqa"
    c.data.text_len = 40
    c.finetune = ml_collections.ConfigDict()
    c.finetune.init_from = None
    c.finetune.weights = "student"
    if "stages" in c.train:  # VLMo's pretraining stages do not apply
        c.train.stages = None
    t = c.train
    t.steps = 1000
    t.warmup_steps = 50
    t.lr = 1e-3
    t.layer_decay = 0.85
    t.head_lr_mult = 10.0
    t.freeze = ()
    c.eval.every = 0
    c.eval.at_end = True
    return c
