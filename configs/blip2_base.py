"""BLIP-2 at the paper's shapes (MODELS.md; Li et al. 2023), with the frozen towers mmjax
can load: stage 1 a Q-Former of BERT-base's size (12 blocks, width 768, 32 queries,
cross-attention every 2nd block, 256-d ITC, 32-token texts) over a frozen CLIP ViT-B/16
at 224 px (BLIP-2 used EVA ViT-g/14: ViT-L/14 or bigger works the same way through
`mmjax convert --from hf-clip`, with model.image set to its variant); stage 2 the queries
into a frozen Vicuna-7B-shaped LM (a Llama checkpoint imported with `mmjax convert --from
hf-llama`: InstructBLIP's and MiniGPT-4's LM; BLIP-2's OPT and FlanT5 are not importable).

    mmjax train --config configs/blip2_base.py --workdir DIR --dry-run --config.parallel.mesh.fsdp=8
    mmjax train --config configs/blip2_base.py:stage1 --workdir workdirs/blip2_b \\
        '--config.finetune.init_parts={"vision": "workdirs/clip_b16:image_tower"}' \\
        --config.finetune.tokenizer_from=workdirs/vicuna --config.data.name=shards --config.data.path=...
    mmjax train --config configs/blip2_base.py:stage2 --workdir workdirs/blip2_b_lm ...
    mmjax train --config configs/blip2_base.py:instructblip ...   # or configs/blip2_base.py:minigpt4

Stage 1: AdamW lr 1e-4 (2,000 warmup steps, cosine to 5e-5 x 0.1), weight decay 0.05,
batch 2,320, 250k steps; stage 2: lr 1e-4, batch 1,920, 80k steps (the paper's);
`instructblip`: the stage-2 shapes with the instruction (128 tokens) in the Q-Former,
lr 1e-5, batch 192, 60k steps (its paper's); `minigpt4`: MiniGPT-4's first stage (only
the projection trains; 20k steps at batch 256, lr 1e-4). The
Q-Former computes in float32 while the towers run in bf16 (LAVIS's fp16 stage 1 gives
an INF loss). The Q-Former is initialised from scratch here (BLIP-2 starts it from
BERT-base, which mmjax cannot import).
"""

import os

from mmjax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("stage1", "stage2", "instructblip", "minigpt4")
VICUNA_7B = dict(width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008, rope_theta=10000.0, tie_embeddings=False)


def _base_qformer(c):
    m = c.model
    m.image, m.image_overrides = "B/16", {}
    m.act, m.ln_eps = "quick_gelu", 1e-5  # a transformers CLIP's tower (mmjax convert --from hf-clip)
    m.qformer, m.qformer_overrides = "B", dict(width=768, depth=12, heads=12, mlp_dim=3072)  # BERT-base
    m.num_query = 32
    m.cross_every = 2
    m.dtype = "bfloat16"
    m.qformer_dtype = "float32"
    c.data.image_size = 224
    c.data.cache_decoded = False


def get_config(arg=None):
    arg = arg or "stage1"
    if arg not in STAGES:
        raise ValueError(f"configs/blip2_base.py argument {arg!r}; valid choices: {', '.join(STAGES)}")
    c = config_lib.recipe(os.path.join(HERE, "blip2.py"), "stage1" if arg == "stage1" else "stage2")
    _base_qformer(c)
    t = c.train
    if arg == "stage1":
        c.model.embed_dim = 256
        c.model.temp_range = (0.001, 0.5)
        c.data.text_len = 32
        c.data.tokenizer.vocab_size = 32000
        c.finetune.init_parts = {"vision": "workdirs/clip_b16:image_tower"}
        c.finetune.tokenizer_from = "workdirs/vicuna"
        t.batch_size, t.lr, t.warmup_steps, t.steps, t.end_lr_factor, t.weight_decay = (
            2320,
            1e-4,
            2000,
            250_000,
            0.5,
            0.05,
        )
        c.eval.every, c.eval.rerank_k = 10_000, 128
        return c
    c.model.lm = dict(VICUNA_7B)
    c.data.text_len = 160  # 32 query slots + the prompt and answer
    c.data.tokenizer.vocab_size = 32000
    c.finetune.init_parts = {
        **{k: f"workdirs/blip2_b:{k}" for k in ("vision", "ln_vision", "qformer")},
        "lm": "workdirs/vicuna",
    }
    t.batch_size, t.lr, t.warmup_steps, t.steps, t.weight_decay = 1920, 1e-4, 2000, 80_000, 0.05
    c.eval.every = 10_000
    if arg == "instructblip":  # the paper's instruction tuning: lr 1e-5, batch 192, 60k steps
        c.model.family = "instructblip"
        c.model.instruction_len = 128  # InstructBLIP's max_txt_len for the Q-Former
        t.batch_size, t.lr, t.warmup_steps, t.steps = 192, 1e-5, 1000, 60_000
    elif arg == "minigpt4":  # stage 1 (stage 2: 400 steps at batch 12, lr 3e-5)
        c.model.family = "minigpt4"
        c.data.chat.template = "minigpt4"
        c.data.chat.task = "caption"
        c.train.freeze = ("^vision/", "^ln_vision/", "^qformer/", "^lm/")
        t.batch_size, t.lr, t.warmup_steps, t.steps = 256, 1e-4, 5000, 20_000
    return c
