"""Special token ids: what the models and objectives know of a tokenizer.

The tokenizer states them (`Tokenizer.special_ids`); a run writes them into the model
config as `model.token_ids`, derived like the vocabulary size (`config.derive_model_keys`),
and every family reads them from there (`ModelConfig.tokens`) and hands them to its
modules and objectives. A config without the key (a workdir older than it, a model
built alone) reads as `MMJAX`: the ids of the sentencepiece models mmjax trains
(`mmjax.data.tokenizer.train_tokenizer`). A tokenizer without a token (an LLM's model
has no <mask>) states None for it; a family that needs it says so when it is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from mmjax.errors import ConfigError

MMJAX = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4, "cls": 5}
NAMES = tuple(MMJAX)


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The special ids of one tokenizer; None where it has no such token."""

    pad: int | None = MMJAX["pad"]
    unk: int | None = MMJAX["unk"]
    bos: int | None = MMJAX["bos"]
    eos: int | None = MMJAX["eos"]
    mask: int | None = MMJAX["mask"]
    cls: int | None = MMJAX["cls"]

    @classmethod
    def of(cls, ids: Mapping | None) -> TokenIds:
        """`model.token_ids` ({name: id or None}) -> TokenIds; None: mmjax's own ids."""
        if ids is None:
            return cls()
        unknown = sorted(set(ids) - set(NAMES))
        if unknown:
            raise ConfigError(f"unknown token name {unknown[0]!r} in model.token_ids; valid names: {', '.join(NAMES)}")
        return cls(**{n: None if ids.get(n) is None else int(ids[n]) for n in NAMES})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def special(self) -> tuple:
        """The ids that are not words (never masked, never a random MLM replacement)."""
        return tuple(sorted({i for i in self.as_dict().values() if i is not None}))

    @property
    def first_word(self) -> int:
        """The first id after the special ones: MLM's random replacements are drawn
        from [first_word, vocab_size) (BERT's vocabulary keeps its specials first too)."""
        return max(self.special, default=-1) + 1

    def need(self, name: str, what: str) -> int:
        """The id of token `name`, or a ConfigError: `what` needs it and the tokenizer has none."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError(
                f"{what} needs a {name} token; the tokenizer has none (model.token_ids: {self.as_dict()}); "
                f"use a tokenizer with a <{name}> piece"
            )
        return value

    def mlm(self, what: str) -> dict:
        """`objectives.mask_tokens` keywords: the mask id (needed), the specials, the first word."""
        return dict(mask_id=self.need("mask", what), special_ids=self.special, first_random_id=self.first_word)
