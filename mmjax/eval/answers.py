"""Generated-answer accuracy of an LM-connector model (a family with the `generate`
capability) on a labelled VQA split: each record's question, phrased as in training
(or with the held-out phrasings: `held_out=True`), rendered with the run's chat
template into a prompt (image + question), answered greedily; an answer counts when
the generated text, stripped and lower-cased, equals the label's name. Reported:
`answer_acc`, `answer_acc_<type>` per answer type, `answer_format_ok` (the share of
answers that are one of the label names at all). A text-only LM (no image) answers
from the question alone: the blind baseline.
"""

from __future__ import annotations

import jax
import numpy as np

from mmjax.parallel import mesh as mesh_lib

MAX_ANSWER_TOKENS = 8


def normalize(text: str) -> str:
    return " ".join(str(text).strip().lower().rstrip(".").split())


class AnswerEvaluator:
    """`__call__(params) -> metrics` (module docstring). Every process reads the whole
    split, generates for its rows of the global batch and the results are gathered."""

    def __init__(self, family, data_config, tokenizer, mesh, *, split: str, batch_size: int, held_out=False):
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
        self._generate = jax.jit(
            lambda p, prompt: family.generate(p, prompt, max_new_tokens=MAX_ANSWER_TOKENS, method="greedy")[0],
            out_shardings=rep,
        )

    def prompts(self, rows) -> dict:
        """Records -> the left-padded prompt arrays {'ids', 'valid', 'image_slots'}."""
        from mmjax.data import chat_data, conversations
        from mmjax.eval.generation import left_pad

        toks, slots = [], []
        for rec in rows:
            conv = chat_data.record_conversation(rec, self.opts, self.scene_kw)
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

        n, i = jax.process_count(), jax.process_index()
        rows = self.batch_size // n
        answers, labels = [], []
        for batch in pipeline.make_eval_iterator(self.data_config, self.tokenizer, self.split, self.batch_size):
            valid = np.asarray(batch["valid"], bool)
            recs = [
                {"caption": c, "label": int(lab), "id": max(int(k), 0)}
                for c, lab, k in zip(batch["caption"], batch["label"], batch["id"])
            ]
            prompt = dict(self.prompts(recs), image=np.asarray(batch["image"]))
            local = {k: v[i * rows : (i + 1) * rows] for k, v in prompt.items()}
            out = np.asarray(self._generate(params, mesh_lib.global_batch(self.mesh, local)))
            for row, ok, lab in zip(out, valid, batch["label"]):
                if ok:
                    answers.append(self._text(row))
                    labels.append(int(lab))
        return answer_metrics(answers, labels, self.names, self.types)

    def _text(self, ids) -> str:
        stop = set(self.family.stop_ids()) | {int(self.tokenizer.pad_id)}
        kept = []
        for t in ids.tolist():
            if t in stop:
                break
            kept.append(t)
        return self.tokenizer.decode_plain(kept)


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
