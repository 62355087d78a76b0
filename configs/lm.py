"""A tiny decoder-only LM (Llama layout: RMSNorm, RoPE, GQA, SwiGLU) pretrained by
next-token prediction on the built-in text:

    mmjax train --config configs/lm.py --workdir workdirs/lm

The text is that of the `shapes_vqa` scenes: captions and question-answer turns,
rendered with the chat template the connector recipes use (data.chat: vicuna turns
without a system prompt; the <image> marker takes no tokens here), so the LM knows the
words and the format before an image is put into it. It is the LLM the connector
recipes (configs/llava.py, configs/cogvlm.py) start from when no imported
checkpoint is given, so demos and tests have one without a download. The eval
reports held-out perplexity on the test split's conversations. An imported LM
(`mmjax convert --from hf-llama|hf-qwen2|hf-gemma`) has the same family, with its
checkpoint's `model.lm`.
"""

import os

import ml_collections

from mmjax import config as config_lib

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config(arg=None):
    c = config_lib.recipe(DEMO, arg)
    c.data.name = "shapes_vqa"
    c.data.text_len = 40
    c.data.tokenizer.vocab_size = 320
    c.data.chat = ml_collections.ConfigDict()
    c.data.chat.template = "vicuna"
    c.data.chat.system = ""  # no system prompt: shorter sequences for the tiny recipes
    c.data.chat.task = "caption_vqa"  # captions and question-answer turns, alternating
    c.data.chat.turns = 2
    c.data.chat.held_out = False
    c.data.chat.on_mismatch = "raise"
    c.data.chat.buckets = None  # e.g. (24, 32): train batches cut to the smallest length that fits
    c.model = ml_collections.ConfigDict()
    c.model.family = "lm"
    # width 128, 4 layers, 4 query heads sharing 2 key/value heads (GQA), SwiGLU 352, tied embeddings
    c.model.lm = dict(width=128, depth=4, heads=4, kv_heads=2, mlp_dim=352, rope_theta=10000.0, tie_embeddings=True)
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.model.attention = "xla"
    c.model.scan_layers = False
    c.model.label_smoothing = 0.0
    c.train.lr = 1e-3
    c.train.steps = 1000
    return c
