"""A Q-Former's queries as a decoder LM's soft prefix: BLIP-2 stage 2, InstructBLIP and
MiniGPT-4 (MODELS.md; issue 18). Conversations, loss masks, generation and LoRA are the
LLaVA family's (mmjax/models/zoo/llava.py); only what fills the image slots differs.

Shape letters: B batch, L sequence, Q queries, N image tokens, Di image width,
Dq Q-Former width, D LM width, Li instruction length.

- Vision: the frozen ViT and `ln_vision` of a BLIP-2 stage-1 workdir (zoo/blip2.py).
- Q-Former: the stage-1 Q-Former; its Q query outputs [B, Q, Dq] go through the
  projector (`model.projector`: 'linear', BLIP-2's and MiniGPT-4's one layer) into the
  LM's width and fill the conversation's Q image slots ([B, Q, D]: data.chat.image_tokens
  is Q).
  - 'blip2_lm' and 'minigpt4': the queries read the image alone (the unimodal mask, no
    text), as BLIP-2 stage 2 and MiniGPT-4 do. MiniGPT-4 differs by its recipe: the
    Q-Former is frozen too and only the projection trains (configs/minigpt4.py).
  - 'instructblip': the instruction enters the Q-Former with the queries (bidirectional
    mask: queries and instruction see each other), so the queries extract what the
    instruction asks for. The instruction is the prompt the LM reads before the first
    answer (the batch's `prefix` tokens that are not image slots, the template's role
    words included), its first `model.instruction_len` tokens, in the LM's vocabulary:
    the Q-Former's word table must be the LM tokenizer's (configs/blip2.py trains stage 1
    with the LM's tokenizer: finetune.tokenizer_from).
- LM: next-token cross entropy on the answer tokens; frozen in BLIP-2's and
  InstructBLIP's recipes (the Q-Former and projection train).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmjax.flops import vit
from mmjax.models.llm import DecoderLM, LMSpec, lm_mask
from mmjax.models.variants import parse_variant
from mmjax.models.zoo.blip2 import qformer_flops, qformer_part, read_vision, vision_kw, vision_parts
from mmjax.models.zoo.contract import register
from mmjax.models.zoo.llava import LlavaConfig, LlavaFamily, Projector, lora_flops, place_images, positions_of
from mmjax.models.zoo.lm import lm_flops
from mmjax.models.zoo.schema import DTYPES, key

Dtype = Any


def instruction_tokens(tokens_BxL, select_BxL, length: int, pad_id: int):
    """The first `length` selected tokens of each row, in order, left-aligned -> (ids
    [B, length] (pad_id where a row has fewer), valid [B, length] bool)."""
    b, n = tokens_BxL.shape
    order = jnp.argsort(~select_BxL, axis=1, stable=True)[:, : min(length, n)]  # selected positions first
    ids = jnp.take_along_axis(tokens_BxL, order, axis=1)
    ok = jnp.take_along_axis(select_BxL, order, axis=1)
    if n < length:
        ids = jnp.pad(ids, ((0, 0), (0, length - n)))
        ok = jnp.pad(ok, ((0, 0), (0, length - n)))
    return jnp.where(ok, ids, pad_id), ok


class QFormerLm(nn.Module):
    """Methods: `image_features(image, tokens, slots, valid, prefix) -> [B, Q, D]` (projected
    query outputs), `inputs(...)` and `__call__(image, tokens, image_slots, valid, prefix)
    -> logits float32 [B, L, V]` as `Llava`'s. Params: `vision`, `ln_vision`, `qformer`,
    `projector`, `lm`."""

    image: Any
    vision_opts: Any
    qformer: Any  # the Q-Former variant (width, depth, heads, mlp_dim)
    spec: LMSpec
    num_query: int = 32
    cross_every: int = 2
    instruction_len: int = 0  # > 0: InstructBLIP (the instruction's tokens enter the Q-Former)
    pad_id: int = 0
    projector: str = "linear"
    prefix_lm: bool = False
    remat: Any = "none"
    scan: bool = False
    attention: str = "xla"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    dtype: Dtype = jnp.float32
    qformer_dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.vision, self.ln_vision = vision_parts(self)
        self.qf = qformer_part(self, self.spec.vocab_size, max(self.instruction_len, 1))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.proj = Projector(self.projector, self.spec.width, name="projector", **kw)
        lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
        self.lm = DecoderLM(self.spec, remat=self.remat, scan=self.scan, attention=self.attention, **lora, **kw)

    def image_features(self, image, tokens_BxL, slots_BxL, valid_BxL, prefix_BxL):
        feats = read_vision(self, image)
        if self.instruction_len:
            select = prefix_BxL & valid_BxL & ~slots_BxL
            ids, ok = instruction_tokens(tokens_BxL, select, self.instruction_len, self.pad_id)
            queries, _ = self.qf(feats, ids, ok, "bidirectional")
        else:
            queries, _ = self.qf(feats, None, None, "unimodal")
        return self.proj(queries.astype(self.dtype))

    def inputs(self, image, tokens_BxL, slots_BxL, valid_BxL, prefix_BxL):
        """-> (x [B, L, D], positions [B, L], mask [B, 1, L, L]): what the LM reads."""
        feats = self.image_features(image, tokens_BxL, slots_BxL, valid_BxL, prefix_BxL)
        x = place_images(self.lm.embed(tokens_BxL), feats, slots_BxL)
        positions = positions_of(valid_BxL, slots_BxL, False)
        return x, positions, lm_mask(valid_BxL, prefix_BxL if self.prefix_lm else None)

    def __call__(self, image, tokens_BxL, slots_BxL, valid_BxL, prefix_BxL):
        x, positions, mask = self.inputs(image, tokens_BxL, slots_BxL, valid_BxL, prefix_BxL)
        return self.lm.logits(self.lm(x, positions, mask))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QFormerLmConfig(LlavaConfig):
    """LlavaConfig's keys (the LM, the vision tower, feature_layer, projector: 'linear'
    here, prefix_lm, LoRA) + the Q-Former's (qformer / qformer_overrides, num_query,
    cross_every, qformer_dtype: as the stage-1 workdir) + instruction_len (instructblip:
    the instruction tokens the Q-Former reads; 0 for the others)."""

    projector: str = key("linear", choices=("linear", "mlp2x_gelu"))
    qformer: str = key("mu")
    qformer_overrides: dict = key({})
    num_query: int = key(32)
    cross_every: int = key(2)
    qformer_dtype: str = key("float32", choices=tuple(DTYPES))
    instruction_len: int = key(0)


@register("blip2_lm", "instructblip", "minigpt4")
class QFormerLmFamily(LlavaFamily):
    """BLIP-2 stage 2 ('blip2_lm'), InstructBLIP ('instructblip', the instruction in the
    Q-Former) and MiniGPT-4 ('minigpt4'): LlavaFamily with the Q-Former's queries in the
    image slots (keys: QFormerLmConfig)."""

    Config = QFormerLmConfig
    part_keys = {
        **LlavaFamily.part_keys,
        "qformer": ("qformer", "qformer_overrides", "num_query", "cross_every"),
    }

    def build_model(self, c, image_variant, kw):
        family = self.config.get("family")
        if self.expert:
            raise ValueError("the Q-Former connectors have no visual expert")
        self.instruction_len = int(c.instruction_len)
        if family == "instructblip" and self.instruction_len < 1:
            raise ValueError(f"model.instruction_len={c.instruction_len}: instructblip needs >= 1")
        if family != "instructblip" and self.instruction_len:
            raise ValueError(f"model.instruction_len={c.instruction_len} is instructblip's; use 0 for {family}")
        self.qformer_variant = parse_variant(c.qformer, c.qformer_overrides, kind="text")
        return QFormerLm(
            qformer=self.qformer_variant,
            spec=self.spec,
            num_query=int(c.num_query),
            cross_every=int(c.cross_every),
            instruction_len=self.instruction_len,
            pad_id=self.pad_id,
            projector=c.projector,
            prefix_lm=c.prefix_lm,
            **vision_kw(c, image_variant),
            **kw,
        )

    def count_image_tokens(self, c, image_variant) -> int:
        """The image's slots: the Q query outputs."""
        return int(c.num_query)

    def flops(self, batch: int) -> dict:
        """Student: the Q-Former (the queries, with the instruction for InstructBLIP), the
        projector 2*Q*Dq*D (+ 2*Q*D*D for mlp2x_gelu), the LM over L tokens and LoRA's
        adapters; teacher: the frozen vision tower's forward."""
        del batch
        im, q, s, nq = self.image_variant, self.qformer_variant, self.spec, self.image_tokens
        n = (self.image_size // im["patch"]) ** 2 + 1
        qf = qformer_flops(q, nq, self.instruction_len, n, im["width"], int(self.c.cross_every))
        proj = 2 * nq * q["width"] * s.width + (2 * nq * s.width * s.width if self.c.projector != "linear" else 0)
        lm = lm_flops(s, self.text_len)
        if self.c.lora_rank:
            lm += lora_flops(s, self.text_len, int(self.c.lora_rank))
        return {"student": qf + proj + lm, "teacher": vit(im, self.image_size)}

    def finish_init(self, params):
        return params
