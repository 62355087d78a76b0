"""Runs the evaluations of a model on a held-out split."""

from __future__ import annotations

import functools
import logging

import jax
import numpy as np

from mmjax.eval import bind, retrieval
from mmjax.eval import zero_shot as zero_shot_lib
from mmjax.parallel import mesh as mesh_lib


class Evaluator:
    """Embeds a split with jitted towers on the mesh and computes the metrics.

    The towers are compiled once; `__call__(params)` can run every N steps.
    `zero_shot`: the eval.zero_shot section (templates, class_names_file); the
    prompts are built and checked to fit data.text_len here, so a prompt that does
    not fit fails the run at its start, not at its first eval.
    """

    def __init__(
        self,
        family,
        data_config,
        tokenizer,
        mesh,
        *,
        split: str,
        batch_size: int,
        max_examples=None,
        rerank_k: int = 16,
        zero_shot=None,
    ):
        self.family, self.data_config, self.tokenizer, self.mesh = family, data_config, tokenizer, mesh
        self.split, self.max_examples = split, max_examples
        from mmjax.data.schema import option

        if "image" not in tuple(option(data_config, "modalities")):  # eval batches carry these, plus text
            raise ValueError(
                f"data.modalities={tuple(option(data_config, 'modalities'))}: the evaluation embeds images and "
                "texts; add 'image' (or set eval.every=0 and eval.at_end=false)"
            )
        # Families with an ITM head (ALBEF, BLIP, VLMo) also report ITM-re-ranked
        # recall and the binding probe scored by ITM.
        self.has_itm = family.can("itm")
        self.rerank_k = int(rerank_k) if self.has_itm else 0
        self.unfit_prompts = 0
        try:
            self.prompts = zero_shot_lib.eval_prompts(data_config, tokenizer, zero_shot)  # (names, ids) or None
        except zero_shot_lib.PromptsTooLong as e:
            if not e.builtin:  # prompts the user gave: the run stops here, at its start
                raise
            # The built-in prompts, for a tokenizer too small for them (a tiny test
            # recipe): no zero_shot_top1 rather than one from cut prompts.
            logging.warning("no zero_shot_top1: %s", e)
            self.prompts, self.unfit_prompts = None, e.count
        n_dev = mesh.devices.size
        self.batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
        # Inputs keep their shardings: params as the train state lays them out (FSDP,
        # tensor), batches split over data x fsdp by `global_batch`.
        rep = mesh_lib.replicated(mesh)
        self._enc_img = jax.jit(family.encode_image, out_shardings=rep)
        self._enc_txt = jax.jit(family.encode_text, out_shardings=rep)
        self.captions = family.can("caption")
        if self.captions:  # CoCa / BLIP: greedy captions of the eval images
            self._caption = jax.jit(
                lambda p, x: family.caption(p, x, max_len=int(data_config.text_len)), out_shardings=rep
            )
        # ImageBind: each bound modality's embedding, for X -> image / text, zero-shot, arithmetic
        self.binds = tuple(family.modalities) if family.can("bind") else ()
        self._enc_x = {m: jax.jit(functools.partial(family.encode_modality, modality=m)) for m in self.binds}
        if self.has_itm:
            self._img_feat = jax.jit(family.image_features, out_shardings=rep)
            self._txt_feat = jax.jit(family.text_features, out_shardings=rep)
            self._itm = jax.jit(family.itm_scores, out_shardings=rep)

    def _global(self, batch: dict) -> dict:
        """A whole global batch (the same numpy arrays on every process) -> global jax
        arrays: each process hands over its own rows. Every process reads the whole
        (small) eval split, so each holds the captions, ids and masks of all rows and
        the metrics come out the same everywhere."""
        n, i = jax.process_count(), jax.process_index()
        rows = self.batch_size // n
        return mesh_lib.global_batch(self.mesh, {k: np.asarray(v)[i * rows : (i + 1) * rows] for k, v in batch.items()})

    def _batched(self, fn, arrays: dict):
        """fn over whole padded batches of equally long numpy arrays -> numpy [N, ...]
        (or a tuple of them when fn returns a tuple)."""
        n = len(next(iter(arrays.values())))
        out = []
        for i in range(0, n, self.batch_size):
            chunk = {k: v[i : i + self.batch_size] for k, v in arrays.items()}
            pad = self.batch_size - len(next(iter(chunk.values())))
            if pad:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in chunk.items()}
            res = fn(self._global(chunk))
            out.append(jax.tree.map(lambda r: np.asarray(r)[: self.batch_size - pad], res))
        return jax.tree.map(lambda *parts: np.concatenate(parts), *out)

    def _itm_pairs(self, params, img_tok, stream, text_ids):
        """ITM scores [P] of P (image tokens, text stream, text ids) pairs."""
        return self._batched(
            lambda a: self._itm(params, a["tok"], a["stream"], a["text"]),
            {"tok": img_tok, "stream": stream, "text": text_ids},
        )

    def _rerank(self, params, img, txt, caps, img_tok, stream, text_ids) -> dict:
        uniq, inverse, first = retrieval.caption_index(caps)

        def score_pairs(img_idx, cap_idx):
            rows = first[cap_idx]
            return self._itm_pairs(params, img_tok[img_idx], stream[rows], text_ids[rows])

        return retrieval.reranked_metrics(retrieval.similarity(img, txt[first]), inverse, score_pairs, self.rerank_k)

    def _encode_text(self, params, tokens: np.ndarray) -> np.ndarray:
        """tokens [N, L] -> [N, D], padded to whole batches for static shapes."""
        out = []
        for i in range(0, len(tokens), self.batch_size):
            chunk = tokens[i : i + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            arr = self._global({"text": chunk})["text"]
            out.append(np.asarray(self._enc_txt(params, arr))[: self.batch_size - pad])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def _embed_split(self, params):
        """Embeds the split (up to max_examples) -> (dict of lists per field, iterator)."""
        from mmjax.data import pipeline  # lazy: TensorFlow lives behind this import

        it = pipeline.make_eval_iterator(self.data_config, self.tokenizer, self.split, self.batch_size)
        fields = ("img", "txt", "caps", "labels", "negs", "neg_valid", "generated", "img_tok", "stream", "text_ids")
        out, seen = {k: [] for k in fields + tuple(f"x_{m}" for m in self.binds)}, 0
        for batch in it:
            valid = np.asarray(batch["valid"], bool)
            arrays = self._global({"image": batch["image"], "text": batch["text"]})
            if self.has_itm:
                for name, x in zip(("img", "img_tok"), self._img_feat(params, arrays["image"])):
                    out[name].append(np.asarray(x)[valid])
                for name, x in zip(("txt", "stream"), self._txt_feat(params, arrays["text"])):
                    out[name].append(np.asarray(x)[valid])
                out["text_ids"].append(np.asarray(batch["text"])[valid])
            else:
                out["img"].append(np.asarray(self._enc_img(params, arrays["image"]))[valid])
                out["txt"].append(np.asarray(self._enc_txt(params, arrays["text"]))[valid])
            out["caps"].extend(np.asarray(batch["caption"])[valid].tolist())
            for m in self.binds:
                x = self._global({"x": batch[m], **({"length": batch[f"{m}_len"]} if f"{m}_len" in batch else {})})
                out[f"x_{m}"].append(np.asarray(self._enc_x[m](params, x=x["x"], length=x.get("length")))[valid])
            if self.captions:
                ids = np.asarray(self._caption(params, arrays["image"]))[valid]
                out["generated"].extend(self.tokenizer.decode(row) for row in ids)
            if "label" in batch:
                out["labels"].append(np.asarray(batch["label"])[valid])
            if "hard_negatives" in batch:
                out["negs"].append(np.asarray(batch["hard_negatives"])[valid])  # [b, K, L]
                out["neg_valid"].append(np.asarray(batch["hard_negatives_valid"], bool)[valid])
            seen += int(valid.sum())
            if self.max_examples and seen >= self.max_examples:
                break
        return out, it

    def __call__(self, params) -> dict:
        got, it = self._embed_split(params)
        if not got["caps"]:
            logging.warning(
                "eval split %r of %r is empty: no evaluation (for a file list, "
                "set data.eval_fraction to hold some rows out)",
                self.split,
                self.data_config.name,
            )
            return {"num_images": 0}
        img, txt, caps = np.concatenate(got["img"]), np.concatenate(got["txt"]), got["caps"]
        metrics = retrieval.retrieval_metrics(img, txt, caps)
        tokens = {k: np.concatenate(got[k]) for k in ("img_tok", "stream", "text_ids")} if self.has_itm else None
        if self.rerank_k:
            metrics.update(
                self._rerank(params, img, txt, caps, tokens["img_tok"], tokens["stream"], tokens["text_ids"])
            )
        if got["negs"]:
            metrics.update(self._probes(params, img, txt, got, tokens))
        class_txt = labels = None
        if got["labels"] and self.prompts is not None:
            _, ids = self.prompts
            class_txt = zero_shot_lib.class_embeddings(lambda toks: self._encode_text(params, toks), ids)
            labels = np.concatenate(got["labels"])
            metrics.update(retrieval.zero_shot_accuracy(img, class_txt, labels))
        elif got["labels"] and self.unfit_prompts:
            metrics["zero_shot_unfit_prompts"] = self.unfit_prompts  # no zero_shot_top1 from cut prompts
        if self.binds:
            xs = {m: np.concatenate(got[f"x_{m}"]) for m in self.binds}
            metrics.update(bind.bind_metrics(xs, img, txt, caps, labels, class_txt))
        if got["generated"]:
            metrics.update(retrieval.caption_metrics(got["generated"], caps))
            for g, c in zip(got["generated"][:3], caps[:3]):
                logging.info("caption: %r (reference %r)", g, c)
        skipped = getattr(it, "skipped", 0)
        if skipped:
            metrics["skipped_records"] = int(skipped)
        return metrics

    def _probes(self, params, img, txt, got, tokens) -> dict:
        """The attribute-binding probe (images) or the time and order probes (clips):
        each image against its own caption and its hard negatives, scored by the
        embeddings and, with an ITM head, by ITM."""
        from mmjax.data import pipeline

        hn, hv = np.concatenate(got["negs"]), np.concatenate(got["neg_valid"])
        n, k, length = hn.shape
        flat = hn.reshape(n * k, length)
        if self.has_itm:
            neg_emb, neg_stream = self._batched(lambda a: self._txt_feat(params, a["text"]), {"text": flat})
        else:
            neg_emb = self._encode_text(params, flat)
        scorings = {
            "": (retrieval.pair_similarity(img, txt), retrieval.pair_similarity(img, neg_emb.reshape(n, k, -1)))
        }
        if self.has_itm:
            # The same probe through the fusion encoder: each image against its own
            # caption and its swapped ones, scored by the ITM head.
            tok = tokens["img_tok"]
            own_itm = self._itm_pairs(params, tok, tokens["stream"], tokens["text_ids"])
            neg_itm = self._itm_pairs(params, np.repeat(tok, k, axis=0), neg_stream, flat)
            scorings["_itm"] = (own_itm, neg_itm.reshape(n, k))
        metrics = {}
        for suffix, (own_s, neg_s) in scorings.items():
            if pipeline.num_frames(self.data_config):
                # Clips (moving_shapes): the negatives are the captions of the clip played
                # backwards (first) and of its events in the other order. An order-blind
                # model scores a clip and its reversal alike: the time probe's chance is 0.5.
                probe = retrieval.binding_accuracy_scores(own_s, neg_s[:, :1], hv[:, :1])
                metrics["time_probe_acc" + suffix] = probe["binding_acc"]
                metrics["time_probe_chance"] = probe["binding_chance"]
                probe = retrieval.binding_accuracy_scores(own_s, neg_s, hv)
                metrics["order_probe_acc" + suffix] = probe["binding_acc"]
                metrics["order_probe_chance"] = probe["binding_chance"]
            else:
                probe = retrieval.binding_accuracy_scores(own_s, neg_s, hv)
                metrics["binding_acc" + suffix], metrics["binding_chance"] = (
                    probe["binding_acc"],
                    probe["binding_chance"],
                )
        return metrics


class ClassificationEvaluator:
    """Top-1 / top-5 accuracy of a classifier or VQA family on a labelled split, and
    top-1 per answer type where the dataset has types (VQA's yes/no, colour, ...).
    Every process reads the whole split and hands its rows to the global batch. A
    family whose `batch_keys` hold "text" (VQA: the question) gets the tokenized text."""

    def __init__(self, family, data_config, mesh, *, split: str, batch_size: int, tokenizer=None):
        self.family, self.data_config, self.mesh, self.split = family, data_config, mesh, split
        self.uses_text = "text" in family.batch_keys
        if self.uses_text and tokenizer is None:
            raise ValueError("this family reads text (the question): pass the run's tokenizer")
        self.tokenizer = tokenizer if self.uses_text else _NoText()
        n_dev = mesh.devices.size
        self.batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
        # Meta-Transformer: one accuracy per modality (`classify_modalities`), each from its own input
        self.modalities = tuple(getattr(family, "classify_modalities", ()))
        rep = mesh_lib.replicated(mesh)
        if self.modalities:
            self._by_mod = {
                m: jax.jit(functools.partial(family.logits, modality=m), out_shardings=rep) for m in self.modalities
            }
        else:
            self._logits = jax.jit(family.logits, out_shardings=rep)
        from mmjax.data import sources

        self.label_map = sources.eval_label_map(data_config)  # data.eval_path's labels -> the training ones

    def __call__(self, params) -> dict:
        from mmjax.data import pipeline

        n, i = jax.process_count(), jax.process_index()
        rows = self.batch_size // n
        keys = ("image", "text") if self.uses_text else ("image",)
        heads = {"": None} if not self.modalities else {f"{m}_": m for m in self.modalities}
        preds, labels = {h: [] for h in heads}, []
        for batch in pipeline.make_eval_iterator(self.data_config, self.tokenizer, self.split, self.batch_size):
            if "label" not in batch:
                raise ValueError(f"split {self.split!r} of {self.data_config.name!r} has no labels to classify")
            valid = np.asarray(batch["valid"], bool)
            for head, m in heads.items():
                logits = np.asarray(self._head_logits(params, batch, m, keys, slice(i * rows, (i + 1) * rows)))
                preds[head].append(np.argsort(-logits[valid], axis=-1)[:, :5])
            label = np.asarray(batch["label"])[valid]
            labels.append(label if self.label_map is None else self.label_map[label])
        if not labels or not sum(map(len, labels)):
            return {"num_images": 0}
        out = {}
        for head in heads:
            metrics = classification_metrics(
                np.concatenate(preds[head]),
                np.concatenate(labels),
                int(self.family.num_classes),
                pipeline.answer_types(self.data_config),
            )
            out.update({(k if k.startswith("num_") else head + k): v for k, v in metrics.items()})
        return out

    def _head_logits(self, params, batch, modality, keys, rows):
        """This process's rows of the batch -> the global batch's logits (one modality's, or the family's)."""
        if modality is None:
            inputs = mesh_lib.global_batch(self.mesh, {k: batch[k][rows] for k in keys})
            return self._logits(params, *(inputs[k] for k in keys))
        names = [k for k in (modality, f"{modality}_len") if k in batch]
        inputs = mesh_lib.global_batch(self.mesh, {k: batch[k][rows] for k in names})
        return self._by_mod[modality](params, inputs[modality], inputs.get(f"{modality}_len"))


def classification_metrics(top5, labels, num_classes: int, types=None) -> dict:
    """top5 [N, k] predicted classes (best first), labels [N] -> top1, top5 and, with
    `types` (a type name per class), top1_<type> over the examples of each type."""
    hit1 = top5[:, 0] == labels
    out = {
        "top1": float(np.mean(hit1)),
        "top5": float(np.mean(np.any(top5 == labels[:, None], axis=-1))),
        "num_images": int(len(labels)),
        "num_classes": num_classes,
    }
    if types:
        types = np.asarray(types)
        for t in dict.fromkeys(types.tolist()):
            sel = types[labels] == t
            if sel.any():
                out["top1_" + t.replace("/", "_")] = float(np.mean(hit1[sel]))
    return out


class _NoText:
    """The eval iterator tokenizes captions; a classifier does not read them."""

    def encode(self, texts, length):
        return np.zeros((len(texts), length), np.int32)
