"""Runs the evaluations of a model on a held-out split."""
from __future__ import annotations

import logging

import jax
import numpy as np

from mmjax.eval import retrieval
from mmjax.parallel import mesh as mesh_lib


class Evaluator:
    """Embeds a split with jitted towers on the mesh and computes the metrics.

    The towers are compiled once; `__call__(params)` can run every N steps.
    """

    def __init__(self, family, data_config, tokenizer, mesh, *, split: str, batch_size: int, max_examples=None):
        self.family, self.data_config, self.tokenizer, self.mesh = family, data_config, tokenizer, mesh
        self.split, self.max_examples = split, max_examples
        n_dev = mesh.devices.size
        self.batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
        rep, bat = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
        self._enc_img = jax.jit(family.encode_image, in_shardings=(rep, bat), out_shardings=rep)
        self._enc_txt = jax.jit(family.encode_text, in_shardings=(rep, bat), out_shardings=rep)

    def _encode_text(self, params, tokens: np.ndarray) -> np.ndarray:
        """tokens [N, L] -> [N, D], padded to whole batches for static shapes."""
        out = []
        for i in range(0, len(tokens), self.batch_size):
            chunk = tokens[i : i + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            arr = mesh_lib.global_batch(self.mesh, {"text": chunk})["text"]
            out.append(np.asarray(self._enc_txt(params, arr))[: self.batch_size - pad])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def __call__(self, params) -> dict:
        from mmjax.data import pipeline  # lazy: TensorFlow lives behind this import

        it = pipeline.make_eval_iterator(
            self.data_config, self.tokenizer, self.split, self.batch_size,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        imgs, txts, caps, labels, negs, neg_valid = [], [], [], [], [], []
        seen = 0
        for batch in it:
            valid = np.asarray(batch["valid"], bool)
            arrays = mesh_lib.global_batch(self.mesh, {"image": batch["image"], "text": batch["text"]})
            imgs.append(np.asarray(self._enc_img(params, arrays["image"]))[valid])
            txts.append(np.asarray(self._enc_txt(params, arrays["text"]))[valid])
            caps.extend(np.asarray(batch["caption"])[valid].tolist())
            if "label" in batch:
                labels.append(np.asarray(batch["label"])[valid])
            if "hard_negatives" in batch:
                hn = np.asarray(batch["hard_negatives"])[valid]  # [b, K, L]
                negs.append(hn)
                neg_valid.append(np.asarray(batch["hard_negatives_valid"], bool)[valid])
            seen += int(valid.sum())
            if self.max_examples and seen >= self.max_examples:
                break
        if seen == 0:
            logging.warning("eval split %r of %r is empty: no evaluation (for a file list, "
                            "set data.eval_fraction to hold some rows out)", self.split, self.data_config.name)
            return {"num_images": 0}
        img, txt = np.concatenate(imgs), np.concatenate(txts)
        metrics = retrieval.retrieval_metrics(img, txt, caps)
        if negs:
            hn = np.concatenate(negs)
            n, k, length = hn.shape
            hv = np.concatenate(neg_valid)
            neg_emb = self._encode_text(params, hn.reshape(n * k, length)).reshape(n, k, -1)
            metrics.update(retrieval.binding_accuracy(img, txt, neg_emb, hv))
        names = pipeline.label_names(self.data_config)
        if labels and names:
            class_txt = retrieval.class_embeddings(
                lambda toks: self._encode_text(params, toks),
                lambda texts: self.tokenizer.encode(texts, self.data_config.text_len),
                names,
            )
            metrics.update(retrieval.zero_shot_accuracy(img, class_txt, np.concatenate(labels)))
        skipped = getattr(it, "skipped", 0)
        if skipped:
            metrics["skipped_records"] = int(skipped)
        return metrics
