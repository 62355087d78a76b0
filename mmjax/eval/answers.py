"""Generated-answer accuracy of an LM-connector model (a family with the `generate`
capability) on a labelled VQA split: each record's question, phrased as in training
(or with the held-out phrasings: `held_out=True`), rendered with the run's chat
template into a prompt (image + question), answered greedily; an answer counts when
the generated text (cut at the template's end piece), stripped and lower-cased, equals
the label's name. Reported:
`answer_acc`, `answer_acc_<type>` per answer type, `answer_format_ok` (the share of
answers that are one of the label names at all). A text-only LM (no image) answers
from the question alone: the blind baseline.

With `captions=True` (eval.captions) each record's image is also captioned: the caption
prompt of the run's template (a training phrasing, or a held-out one), answered greedily
up to MAX_CAPTION_TOKENS, scored against the record's caption (`caption_exact`,
`caption_bleu4`, `caption_cider`: eval.retrieval.caption_metrics).
"""

from __future__ import annotations

import jax
import numpy as np

from mmjax.parallel import mesh as mesh_lib

MAX_ANSWER_TOKENS = 8
MAX_CAPTION_TOKENS = 24


def normalize(text: str) -> str:
    return " ".join(str(text).strip().lower().rstrip(".").split())


class AnswerEvaluator:
    """`__call__(params) -> metrics` (module docstring). Every process reads the whole
    split, generates for its rows of the global batch and the results are gathered."""

    def __init__(
        self, family, data_config, tokenizer, mesh, *, split: str, batch_size: int, held_out=False, captions=False
    ):
        from mmjax.data import chat_data, sources

        self.family, self.data_config, self.tokenizer, self.mesh = family, data_config, tokenizer, mesh
        self.split = split
        opts = chat_data.chat_options(data_config)
        if opts is None:
            raise ValueError("the answer eval needs data.chat (the chat template the model was trained with)")
        self.opts = dict(opts, task="vqa", held_out=bool(held_out))
        self.scene_kw = chat_data._scene_kw(data_config, split)
        self.names = sources.label_names(data_config)
        self.types = sources.answer_types(data_config)
        if not self.names:
            raise ValueError(f"split {split!r} of {data_config.name!r} has no answer labels to compare with")
        n_dev = mesh.devices.size
        self.batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
        rep = mesh_lib.replicated(mesh)
        run = lambda n: jax.jit(
            lambda p, prompt: family.generate(p, prompt, max_new_tokens=n, method="greedy")[0], out_shardings=rep
        )
        self._generate = run(MAX_ANSWER_TOKENS)
        self._caption = run(MAX_CAPTION_TOKENS) if captions else None

    def prompts(self, rows, task: str = "vqa") -> dict:
        """Records -> the left-padded prompt arrays {'ids', 'valid', 'image_slots'} of their
        first `task` round ('vqa': the question; 'caption': the caption prompt)."""
        from mmjax.data import chat_data, conversations
        from mmjax.eval.generation import left_pad

        toks, slots = [], []
        for rec in rows:
            conv = chat_data.record_conversation(rec, dict(self.opts, task=task), self.scene_kw)
            conv.turns = conv.turns[:1]
            p = conversations.encode_prompt(
                conv, self.tokenizer, self.opts["template"], image_tokens=int(self.opts["image_tokens"])
            )
            toks.append(p["tokens"].tolist())
            slots.append(p["image_slots"].tolist())
        ids, valid = left_pad(toks, int(self.tokenizer.pad_id))
        image_slots = np.zeros_like(valid)
        for i, s in enumerate(slots):
            image_slots[i, ids.shape[1] - len(s) :] = s
        return {"ids": ids, "valid": valid, "image_slots": image_slots}

    def __call__(self, params) -> dict:
        from mmjax.data import pipeline

        answers, labels, captions, refs = [], [], [], []
        for batch in pipeline.make_eval_iterator(self.data_config, self.tokenizer, self.split, self.batch_size):
            valid = np.asarray(batch["valid"], bool)
            recs = [
                {"caption": c, "label": int(lab), "id": max(int(k), 0)}
                for c, lab, k in zip(batch["caption"], batch["label"], batch["id"])
            ]
            image = np.asarray(batch["image"])
            out = self._run(self._generate, params, dict(self.prompts(recs), image=image))
            answers += [self._text(row) for row, ok in zip(out, valid) if ok]
            labels += [int(lab) for lab, ok in zip(batch["label"], valid) if ok]
            if self._caption is not None:
                out = self._run(self._caption, params, dict(self.prompts(recs, "caption"), image=image))
                captions += [self._text(row) for row, ok in zip(out, valid) if ok]
                refs += [self._reference(rec) for rec, ok in zip(recs, valid) if ok]
        metrics = answer_metrics(answers, labels, self.names, self.types)
        if self._caption is not None:
            from mmjax.eval.retrieval import caption_metrics

            metrics.update(caption_metrics(captions, refs))
        return metrics

    def _run(self, generate, params, prompt: dict) -> np.ndarray:
        """One global batch of prompts (this process's rows handed over) -> tokens [B, N]."""
        n, i = jax.process_count(), jax.process_index()
        rows = self.batch_size // n
        local = {k: v[i * rows : (i + 1) * rows] for k, v in prompt.items()}
        return np.asarray(generate(params, mesh_lib.global_batch(self.mesh, local)))

    def _reference(self, rec: dict) -> str:
        """The record's scene caption (the caption conversation's answer)."""
        from mmjax.data import chat_data

        conv = chat_data.record_conversation(rec, dict(self.opts, task="caption"), self.scene_kw)
        return conv.turns[0][1]

    def _text(self, ids) -> str:
        stop = set(self.family.stop_ids()) | {int(self.tokenizer.pad_id)}
        kept = []
        for t in ids.tolist():
            if t in stop:
                break
            kept.append(t)
        from mmjax.data.chat_templates import stop_strings
        from mmjax.eval.generation import truncate_at_stop

        # A template whose end piece is text (MiniGPT-4's '###') ends the answer there.
        return truncate_at_stop(self.tokenizer.decode_plain(kept), stop_strings(self.opts["template"]))[0]


def answer_metrics(answers, labels, names, types=None) -> dict:
    """Exact-match accuracy of generated answers against label names, overall and per type."""
    if not labels:
        return {"answer_count": 0}
    want = [normalize(names[k]) for k in labels]
    got = [normalize(a) for a in answers]
    hit = np.array([g == w for g, w in zip(got, want)], float)
    known = {normalize(x) for x in names}
    out = {
        "answer_acc": float(hit.mean()),
        "answer_format_ok": float(np.mean([g in known for g in got])),
        "answer_count": len(labels),
    }
    if types:
        kinds = np.array([types[k] for k in labels])
        for t in sorted(set(kinds)):
            out["answer_acc_" + t.replace("/", "_")] = float(hit[kinds == t].mean())
    return out
