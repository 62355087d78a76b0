"""The README.md model card of an hf-clip export (`mmjax export --format hf-clip`):
what was trained on what, how it was exported, and how to use it from transformers
with the run's sentencepiece tokenizer."""

from __future__ import annotations

import os

CARD = """---
library_name: transformers
tags:
- clip
- mmjax
---

# CLIP trained with mmjax

Exported by mmjax {version} with
`mmjax export --format hf-clip --workdir {workdir} --weights {weights} --step {step}`.

| | |
|---|---|
{table}

## Use

```python
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

model = CLIPModel.from_pretrained("OUT").eval()
processor = CLIPImageProcessor.from_pretrained("OUT")
pixels = processor(images=Image.open("cat.png"), return_tensors="pt")["pixel_values"]
with torch.no_grad():
    out = model.get_image_features(pixel_values=pixels)
image_features = out if torch.is_tensor(out) else out.pooler_output  # transformers 5: an output object
```

`preprocessor_config.json` prepares images as mmjax's evaluation did: RGB, resized to
{size}x{size} (bilinear, antialiased; no center crop), scaled to [0, 1], then normalised
with mean {mean} and std {std}. PIL's resize
differs from mmjax's (TensorFlow's) by about 1/255 of the pixel range.

## Text

{text}

## Training config

The workdir's `config.json` (the mmjax recipe with its run-time values):

<details>

```json
{config_json}
```

</details>
"""

TEXT_WITH_TOKENIZER = """`{tokenizer}` is the run's [sentencepiece](https://github.com/google/sentencepiece) model
(pad={pad}, bos={bos}, eos={eos}). It is not a `CLIPTokenizer` (byte-level BPE): `CLIPProcessor`
and `AutoTokenizer` do not load it. Make the ids as mmjax does, lower-cased,
`[bos] + pieces[:{max_len} - 2] + [eos]`, padded with pad to {max_len}:

```python
import sentencepiece as spm
import torch

sp = spm.SentencePieceProcessor(model_file="{tokenizer}")
def tokenize(texts, max_len={max_len}):
    rows = [[sp.bos_id()] + sp.encode(t.lower())[:max_len - 2] + [sp.eos_id()] for t in texts]
    return torch.tensor([r + [sp.pad_id()] * (max_len - len(r)) for r in rows])

ids = tokenize(["a red circle left of a blue square"])
with torch.no_grad():
    out = model.get_text_features(input_ids=ids)
text_features = out if torch.is_tensor(out) else out.pooler_output
```"""

TEXT_WITHOUT_TOKENIZER = (
    "The workdir had no sentencepiece tokenizer.model to copy; the text tower takes the "
    "ids of the tokenizer its source used."
)


def _get(section, key, default="?"):
    return section.get(key, default) if section is not None else default


def _rows(config, *, step: int, weights: str, size: int) -> list[tuple[str, object]]:
    """The card's table: (what, value) rows."""
    from mmjax.export.formats import mmjax_version

    m, d, t = config.model, config.get("data", {}), config.get("train", {})

    def tower(name):
        overrides = _get(m, name + "_overrides", {})
        return f"`{_get(m, name)}`" + (f" with {dict(overrides or {})}" if overrides else "")

    data_name = _get(d, "name")
    if data_name == "files" and _get(d, "path", None):
        data_name = f"files ({os.path.basename(str(d.path))})"
    imported = bool(_get(m, "keep_vocab_size", False))
    trained = bool(step) or not imported  # step 0 of an import: no training in mmjax yet
    training = (
        f"{_get(t, 'steps')} steps, batch {_get(t, 'batch_size')}, lr {_get(t, 'lr')} "
        f"(warmup {_get(t, 'warmup_steps')}), weight decay {_get(t, 'weight_decay')}"
    )
    return [
        ("family", "CLIP (two towers, contrastive ITC, `model.loss=" + str(_get(m, "loss")) + "`)"),
        ("image tower", f"{tower('image')}, {size}x{size} pixels"),
        ("text tower", f"{tower('text')}, {_get(m, 'text_len')} tokens, vocabulary {_get(m, 'vocab_size')}"),
        ("embedding dim", _get(m, "embed_dim")),
        ("source", "imported with `mmjax convert --from hf-clip`" if imported else "trained by mmjax"),
        ("data", f"`{data_name}` (split `{_get(d, 'train_split')}`)" if trained else "none yet"),
        ("training", training if trained else "none in mmjax (step 0 is the imported weights)"),
        ("checkpoint", f"step {step}, {'EMA teacher' if weights == 'ema' else 'student'} weights"),
        ("mmjax", mmjax_version()),
    ]


def _text_section(max_len, tokenizer: str | None, tokenizer_path: str | None) -> str:
    if not tokenizer:
        return TEXT_WITHOUT_TOKENIZER
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path or tokenizer)
    return TEXT_WITH_TOKENIZER.format(
        tokenizer=tokenizer, pad=sp.pad_id(), bos=sp.bos_id(), eos=sp.eos_id(), max_len=max_len
    )


def model_card(
    config,
    *,
    workdir: str,
    step: int,
    weights: str,
    preprocessor: dict,
    tokenizer: str | None,
    tokenizer_path: str | None = None,
) -> str:
    """README.md of an hf-clip export: what was trained on what, and how to use it.
    tokenizer: the sentencepiece file's name in the export (tokenizer_path: where it is)."""
    from mmjax.export.formats import mmjax_version

    size = preprocessor["size"]["height"]
    rows = _rows(config, step=step, weights=weights, size=size)
    return CARD.format(
        version=mmjax_version(),
        workdir=workdir,
        weights=weights,
        step=step,
        table="\n".join(f"| {k} | {v} |" for k, v in rows),
        size=size,
        mean=preprocessor["image_mean"],
        std=preprocessor["image_std"],
        text=_text_section(_get(config.model, "text_len"), tokenizer, tokenizer_path),
        config_json=config.to_json_best_effort(indent=2, sort_keys=True),
    )
