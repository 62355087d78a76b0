"""SentencePiece tokenizer: training from captions, encoding to fixed-length ids.

No TensorFlow import here. Ids: pad=0, unk=1, bos=2, eos=3, <mask>=4, <cls>=5.
Captions are lower-cased before training and encoding (mmjax's own models); an LLM's
sentencepiece model is loaded with `lowercase=False` (`load_tokenizer`). Chat data uses
`encode_plain` / `decode_plain` / `token_id` (no bos/eos added).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable

import numpy as np
import sentencepiece as spm

log = logging.getLogger(__name__)
MODEL_NAME = "tokenizer.model"


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    try:
        v = cfg.get(key, default)
    except AttributeError:
        v = getattr(cfg, key, default)
    return default if v is None else v


def train_tokenizer(captions: Iterable[str], out_dir: str, vocab_size: int, model_type: str = "bpe") -> str:
    """Train a sentencepiece model on `captions`; returns `out_dir/tokenizer.model`."""
    os.makedirs(out_dir, exist_ok=True)
    sents = [c.lower() for c in captions if c and c.strip()]
    if not sents:
        raise ValueError("train_tokenizer: no captions to train on")
    prefix = os.path.join(out_dir, MODEL_NAME[: -len(".model")])
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sents),
        model_prefix=prefix,
        vocab_size=int(vocab_size),
        model_type=model_type,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=["<mask>", "<cls>"],
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return prefix + ".model"


class Tokenizer:
    """Loaded sentencepiece model. `encode(texts, L) -> int32 [N, L]` as
    `bos tokens... eos pad...` (tokens truncated so bos and eos always fit).
    `lowercase`: texts are lower-cased before encoding (mmjax's own models; an LLM's
    sentencepiece model keeps case: False)."""

    def __init__(self, model_path: str, lowercase: bool = True):
        self.model_path = str(model_path)
        self.lowercase = bool(lowercase)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
        self.pad_id = self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.mask_id = self._piece("<mask>")
        self.cls_id = self._piece("<cls>")
        self.vocab_size = self.sp.get_piece_size()
        self.truncated = 0  # texts cut to fit max_len so far (a silent cut hides words)
        self._warned = False

    def _piece(self, piece: str):
        """The id of a user-defined piece, or None where the model has none (sentencepiece
        answers an unknown piece with the unk id)."""
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and self.sp.id_to_piece(i) != piece else i

    @property
    def special_ids(self) -> dict:
        """{'pad', 'unk', 'bos', 'eos', 'mask', 'cls': id, or None where the model has no
        such token}: the contract with the models (`mmjax.models.tokens`, `model.token_ids`)."""
        ids = dict(
            pad=self.pad_id, unk=self.unk_id, bos=self.bos_id, eos=self.eos_id, mask=self.mask_id, cls=self.cls_id
        )
        return {k: None if v is None or v < 0 else int(v) for k, v in ids.items()}

    def encode(self, texts: list[str], max_len: int) -> np.ndarray:
        """list of N str -> int32 [N, max_len] (max_len >= 2)."""
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
        out = np.full((len(texts), max_len), self.pad_id, np.int32)
        if not texts:
            return out
        cut = 0
        for i, ids in enumerate(self.sp.encode([self._case(t) for t in texts])):
            cut += len(ids) > max_len - 2
            ids = [self.bos_id] + ids[: max_len - 2] + [self.eos_id]
            out[i, : len(ids)] = ids
        if cut:
            self.truncated += cut
            if not self._warned:
                self._warned = True
                log.warning(
                    "tokenizer: %d of %d texts longer than text_len=%d were truncated "
                    "(e.g. %r); raise data.text_len or data.tokenizer.vocab_size",
                    cut,
                    len(texts),
                    max_len,
                    texts[0][:80],
                )
        return out

    def _case(self, text: str) -> str:
        return text.lower() if self.lowercase else text

    def encode_plain(self, text: str) -> list[int]:
        """str -> token ids, no bos/eos (lower-cased iff `lowercase`)."""
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        return [int(i) for i in self.sp.encode(self._case(text))]

    def decode_plain(self, ids) -> str:
        """int ids [L] -> str, dropping only pad (sentencepiece renders no text for bos/eos)."""
        return self.sp.decode([int(i) for i in np.asarray(ids).reshape(-1) if int(i) != self.pad_id])

    def token_id(self, piece: str) -> int | None:
        """The id of one piece (e.g. '</s>', '<mask>'), or None where the model has no such piece."""
        return self._piece(piece)

    def decode(self, ids) -> str:
        """int ids [L] -> str, dropping pad/bos/eos/cls/mask."""
        special = {i for k, i in self.special_ids.items() if k != "unk"}
        return self.sp.decode([int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in special])


def get_tokenizer(tok_config, workdir: str | None, captions_fn: Callable[[], Iterable[str]]) -> Tokenizer:
    """`tok_config.path` if set (a sentencepiece .model or an HF tokenizer.json, lower-casing
    as `tok_config.lowercase` says, default True); else reuse `workdir/tokenizer.model`; else train it there
    on `captions_fn()` with `tok_config.vocab_size` (default 8000)."""
    path = _get(tok_config, "path")
    if path:
        path = os.path.expanduser(str(path))
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        return load_tokenizer(path, lowercase=bool(_get(tok_config, "lowercase", True)))
    if workdir is None:
        raise ValueError("get_tokenizer: need tok_config.path or a workdir")
    path = os.path.join(workdir, MODEL_NAME)
    if os.path.exists(path):
        log.info("reusing tokenizer %s", path)
        return Tokenizer(path)
    vocab = int(_get(tok_config, "vocab_size", 8000))
    log.info("training a %d-piece tokenizer into %s", vocab, path)
    return Tokenizer(train_tokenizer(captions_fn(), workdir, vocab))


def load_tokenizer(path: str, lowercase: bool | None = None):
    """A tokenizer from a file or directory:

    - a sentencepiece `.model` file (or a directory holding `tokenizer.model` and no
      `tokenizer.json`) -> `Tokenizer(path, lowercase=False)` (an LLM's model keeps case;
      pass `lowercase=True` for one of mmjax's own);
    - a `tokenizer.json` (any `*.json` file), or a directory holding one ->
      `mmjax.data.hf_tokenizer.HFTokenizer(path)` (the `tokenizers` library; keeps case
      unless lowercase=True).
    """
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        for name, kind in (("tokenizer.json", "hf"), (MODEL_NAME, "sp")):
            if os.path.isfile(os.path.join(path, name)):
                return _load(os.path.join(path, name) if kind == "sp" else path, kind, lowercase)
        raise FileNotFoundError(f"load_tokenizer: no tokenizer.json or {MODEL_NAME} in {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if path.endswith(".json"):
        return _load(path, "hf", lowercase)
    return _load(path, "sp", lowercase)


def _load(path: str, kind: str, lowercase: bool | None):
    if kind == "sp":
        return Tokenizer(path, lowercase=bool(lowercase))
    from mmjax.data.hf_tokenizer import HFTokenizer

    return HFTokenizer(path) if not lowercase else HFTokenizer(path, lowercase=True)
