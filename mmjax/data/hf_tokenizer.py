"""A Hugging Face `tokenizer.json` (the `tokenizers` library) with mmjax's tokenizer
interface (`mmjax.data.tokenizer.Tokenizer`): the tokenizers of Llama 3, Qwen2, Gemma, ...

Special ids: bos / eos / pad / unk are read from the files beside tokenizer.json (same
name prefix: `hf_tokenizer.json` reads `hf_tokenizer_config.json`), the first file that
names the token deciding (an explicit null there means "none"): tokenizer_config.json,
special_tokens_map.json (token strings), generation_config.json, config.json (ids; eos:
the first of a list). pad falls back to eos, then to 0 (a pad id only fills masked
positions). unk falls back to the model's unk_token. mask and cls are None (an LLM's
tokenizer has neither). `encode` puts bos first unless the tokenizer has none or
tokenizer_config.json says add_bos_token false (Qwen2 has none). Case is kept
(lowercase=False). No TensorFlow import.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

log = logging.getLogger(__name__)
TOKENIZER_JSON = "tokenizer.json"
ID_FILES = ("generation_config.json", "config.json")  # {name}_token_id
TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # {name}_token: str or {"content": str}


def _read(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _beside(path: str, name: str) -> str:
    """The companion file `name` of tokenizer file `path` (with its name prefix)."""
    base = os.path.basename(path)
    prefix = base[: -len(TOKENIZER_JSON)] if base.endswith(TOKENIZER_JSON) else ""
    return os.path.join(os.path.dirname(path), prefix + name)


def special_ids_beside(path: str, tok) -> dict:
    """{'bos', 'eos', 'pad', 'unk': id or None} of the tokenizer file at `path` from its
    companion files (see the module docstring); `tok`: the loaded tokenizers.Tokenizer."""
    out = {}
    for name in ("bos", "eos", "pad", "unk"):
        out[name] = None
        for f in TOKEN_FILES + ID_FILES:
            data, key = _read(_beside(path, f)), f"{name}_token" if f in TOKEN_FILES else f"{name}_token_id"
            if key not in data:
                continue
            v = data[key]
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                v = tok.token_to_id(v)
            elif isinstance(v, (list, tuple)):
                v = v[0] if v else None
            out[name] = None if v is None else int(v)
            break
    if out["unk"] is None and getattr(tok.model, "unk_token", None):
        out["unk"] = tok.token_to_id(tok.model.unk_token)
    if out["pad"] is None:
        out["pad"] = out["eos"] if out["eos"] is not None else 0
    return out


class HFTokenizer:
    """A loaded tokenizer.json. `encode(texts, L) -> int32 [N, L]` as `bos tokens... eos
    pad...` (bos only when the tokenizer has one; tokens truncated so bos and eos fit).

    path: a tokenizer.json (any name) or a directory holding one."""

    def __init__(self, path: str, lowercase: bool = False):
        from tokenizers import Tokenizer as _Tokenizer

        path = str(path)
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_JSON)
        self.model_path = path
        self.lowercase = bool(lowercase)
        self.tok = _Tokenizer.from_file(path)
        self.tok.no_padding()
        self.tok.no_truncation()
        ids = special_ids_beside(path, self.tok)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = ids["pad"], ids["unk"], ids["bos"], ids["eos"]
        self.mask_id = self.cls_id = None
        self.add_bos = (
            self.bos_id is not None and _read(_beside(path, TOKEN_FILES[0])).get("add_bos_token") is not False
        )
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.truncated = 0  # texts cut to fit max_len so far
        self._warned = False

    @property
    def special_ids(self) -> dict:
        """{'pad', 'unk', 'bos', 'eos', 'mask', 'cls': id or None} (`mmjax.models.tokens`)."""
        ids = dict(
            pad=self.pad_id, unk=self.unk_id, bos=self.bos_id, eos=self.eos_id, mask=self.mask_id, cls=self.cls_id
        )
        return {k: None if v is None or v < 0 else int(v) for k, v in ids.items()}

    def _texts(self, texts):
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
        return [t.lower() for t in texts] if self.lowercase else texts

    def encode(self, texts: list[str], max_len: int) -> np.ndarray:
        """list of N str -> int32 [N, max_len]: bos (if any) + tokens + eos, then pad."""
        texts = self._texts(texts)
        out = np.full((len(texts), max_len), self.pad_id, np.int32)
        head = [self.bos_id] if self.add_bos else []
        tail = [] if self.eos_id is None else [self.eos_id]
        room = max_len - len(head) - len(tail)
        cut = 0
        for i, enc in enumerate(self.tok.encode_batch(texts, add_special_tokens=False) if texts else []):
            cut += len(enc.ids) > room
            ids = head + enc.ids[:room] + tail
            out[i, : len(ids)] = ids
        if cut:
            self.truncated += cut
            if not self._warned:
                self._warned = True
                log.warning(
                    "tokenizer: %d of %d texts longer than text_len=%d were truncated (e.g. %r); raise data.text_len",
                    cut,
                    len(texts),
                    max_len,
                    texts[0][:80],
                )
        return out

    def decode(self, ids) -> str:
        """int ids [L] -> str, dropping pad / bos / eos and the tokenizer's special tokens."""
        special = {i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None}
        keep = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in special]
        return self.tok.decode(keep, skip_special_tokens=True)

    def encode_plain(self, text: str) -> list[int]:
        """str -> token ids, no bos / eos added (chat templates place their own)."""
        return list(self.tok.encode(self._texts([text])[0], add_special_tokens=False).ids)

    def decode_plain(self, ids) -> str:
        """ids -> str keeping every token but pad (which is eos where the tokenizer has no pad)."""
        return self.tok.decode(
            [int(i) for i in np.asarray(ids).reshape(-1) if int(i) != self.pad_id], skip_special_tokens=False
        )

    def token_id(self, piece: str) -> int | None:
        """The id of a token (an added / special one too), None where there is none."""
        return self.tok.token_to_id(piece)
