"""Held-out perplexity of a decoder LM (a family with the `lm` capability) on the
text of an eval split (its captions, or with data.chat its conversations rendered as
in training): exp(summed token NLL / target tokens), every non-pad token after the
first of each row a target (what the LM is trained to predict)."""

from __future__ import annotations

import math

import jax
import numpy as np

from mmjax.parallel import mesh as mesh_lib


class PerplexityEvaluator:
    """`__call__(params) -> {'perplexity', 'nll_per_token', 'eval_texts', 'eval_tokens'}`.

    Every process reads the whole split and hands its rows to the global batch (as
    the classification evaluator does); the NLL is computed jitted on the mesh."""

    def __init__(self, family, data_config, tokenizer, mesh, *, split: str, batch_size: int, max_examples=None):
        self.family, self.data_config, self.tokenizer, self.mesh = family, data_config, tokenizer, mesh
        self.split, self.max_examples = split, max_examples
        n_dev = mesh.devices.size
        self.batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
        self._nll = jax.jit(family.token_nll, out_shardings=mesh_lib.replicated(mesh))
        from mmjax.data import chat_data

        self.chat = None  # with data.chat: the split's conversations, rendered as in training
        if chat_data.chat_options(data_config) is not None:
            length = int(data_config.text_len)
            self.chat = chat_data.ChatCollator(data_config, tokenizer, text_len=length, split=split)

    def __call__(self, params) -> dict:
        from mmjax.data import pipeline

        n, i = jax.process_count(), jax.process_index()
        rows = self.batch_size // n
        nll = tokens = texts = 0.0
        length = int(self.data_config.text_len)
        for batch in pipeline.make_eval_iterator(self.data_config, self.tokenizer, self.split, self.batch_size):
            local = {"text": np.asarray(batch["text"])[:, :length]}  # caption rows: the family finds their tokens
            if self.chat is not None:  # conversations mark their tokens
                got = self.chat.encode(self.chat.rows({**batch, "id": np.maximum(batch["id"], 0)}))
                local = {"text": got["tokens"], "valid": got["valid"]}
            inputs = mesh_lib.global_batch(self.mesh, {k: v[i * rows : (i + 1) * rows] for k, v in local.items()})
            row_nll, row_count = (np.asarray(x) for x in self._nll(params, *inputs.values()))
            valid = np.asarray(batch["valid"], bool)
            if self.max_examples is not None:
                valid &= np.cumsum(valid) + texts <= int(self.max_examples)
            nll += float(row_nll[valid].sum())
            tokens += float(row_count[valid].sum())
            texts += int(valid.sum())
        if not tokens:
            return {"eval_texts": int(texts), "eval_tokens": 0}
        return {
            "perplexity": math.exp(nll / tokens),
            "nll_per_token": nll / tokens,
            "eval_texts": int(texts),
            "eval_tokens": int(tokens),
        }
