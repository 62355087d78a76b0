"""VLMo's and BEiT-3's linen module: embeddings + one MultiwayEncoder + projections and
heads (ITM, MLM, MDM); the family (zoo/multiway.py) runs its passes.

Shape letters: B batch, T image tokens ([CLS] + N patches), N patches, L text
length, D width, E embed dim, V vocabulary.
"""

import math
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.attention import padding_mask
from mmjax.models.embed import PatchEmbed, WordEmbed
from mmjax.models.fusion import ItmHead, MlmHead, head_dense
from mmjax.models.multiway import MultiwayEncoder
from mmjax.models.tokens import MMJAX
from mmjax.models.zoo.clip import l2_normalize
from mmjax.parallel.sharding import dense_init, names

Dtype = Any


class Multiway(nn.Module):
    """Embeddings + MultiwayEncoder + projections and heads (ITM, MLM, MDM)."""

    size: Any  # parse_variant(kind='image') dict: width, depth, heads, mlp_dim, patch
    image_size: int
    vocab_size: int
    text_len: int
    embed_dim: int
    layout: str = "vlmo"
    vl_from: Any = None
    itc_vl: bool = False  # VLMo's second ITC on VL-FFN features (needs vl_from)
    pad_id: int = MMJAX["pad"]  # the tokenizer's (model.token_ids)
    remat: Any = False  # False | 'none' | True | 'full' | 'dots' (transformer.REMAT_POLICIES)
    attention: str = "xla"  # 'xla' | 'cudnn', '/N' pads lengths to a multiple of N (attention.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        s, kw = self.size, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.image_size % s["patch"]:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {s['patch']}")
        n = (self.image_size // s["patch"]) ** 2
        self.patch_embed = PatchEmbed(s["patch"], s["width"], **kw)
        self.image_cls = self.param(
            "image_cls", names(nn.initializers.zeros, None, None, "embed"), (1, 1, s["width"]), self.param_dtype
        )
        self.image_pos = self.param(
            "image_pos",
            names(nn.initializers.normal(0.02), None, None, "embed"),
            (1, n + 1, s["width"]),
            self.param_dtype,
        )
        self.mask_token = self.param(
            "mask_token", names(nn.initializers.normal(0.02), None, None, "embed"), (1, 1, s["width"]), self.param_dtype
        )
        self.word_embed = WordEmbed(self.vocab_size, s["width"], self.text_len, **kw)
        self.encoder = MultiwayEncoder(
            s["depth"],
            s["heads"],
            s["mlp_dim"],
            layout=self.layout,
            vl_from=self.vl_from,
            remat=self.remat,
            attention=self.attention,
            **kw,
        )
        # The projections are heads: float32 matmuls whatever the compute dtype (fusion.head_dense).
        self.image_proj = head_dense(self.embed_dim, use_bias=False, param_dtype=self.param_dtype)
        self.text_proj = head_dense(self.embed_dim, use_bias=False, param_dtype=self.param_dtype)
        self.itm_head = ItmHead(**kw)
        self.mlm_head = MlmHead(self.vocab_size, **kw)
        self.mdm_head = nn.Dense(s["patch"] ** 2 * 3, **kw, **dense_init("embed", None))
        self.t = self.param("t", names(nn.initializers.constant(math.log(1 / 0.07))), (), jnp.float32)
        if self.itc_vl:
            if self.vl_from is None:
                raise ValueError("the VL-FFN ITC (model.itc_vlffn) needs a VL expert: set model.vl_from")
            self.vl_image_proj = head_dense(self.embed_dim, use_bias=False, param_dtype=self.param_dtype)
            self.vl_text_proj = head_dense(self.embed_dim, use_bias=False, param_dtype=self.param_dtype)
            self.t_vl = self.param("t_vl", names(nn.initializers.constant(math.log(1 / 0.07))), (), jnp.float32)

    # Embedded inputs ----------------------------------------------------------------
    def image_tokens(self, image_BxHxWx3, patch_mask_BxN=None):
        """-> [B, T, D]; patches where `patch_mask` is True become the [MASK] token."""
        x_BxNxD = self.patch_embed(image_BxHxWx3)
        b, n, d = x_BxNxD.shape
        if patch_mask_BxN is not None:
            chex.assert_shape(patch_mask_BxN, (b, n))
            mask_tok = jnp.asarray(self.mask_token, x_BxNxD.dtype)
            x_BxNxD = jnp.where(patch_mask_BxN[:, :, None], mask_tok, x_BxNxD)
        cls = jnp.broadcast_to(jnp.asarray(self.image_cls, x_BxNxD.dtype), (b, 1, d))
        return jnp.concatenate([cls, x_BxNxD], axis=1) + jnp.asarray(self.image_pos, x_BxNxD.dtype)

    def text_tokens(self, ids_BxL):
        return self.word_embed(ids_BxL)

    # Passes ------------------------------------------------------------------------
    def image_pass(self, img_BxTxD):
        y, _ = self.encoder(img_BxTxD, None, (("image", img_BxTxD.shape[1]),))
        return y

    def text_pass(self, txt_BxLxD, ids_BxL):
        mask = padding_mask(ids_BxL != self.pad_id)
        y, _ = self.encoder(txt_BxLxD, mask, (("text", txt_BxLxD.shape[1]),))
        return y

    def _with_vl(self, x_BxLxD, mask, spans):
        """A single-modality pass, and (VLMo's release, `infer_image` / `infer_text`) the
        same tokens again through blocks vl_from.. with the VL expert from block
        vl_from - 1's output, normed by `ln_final_vl`. -> (y, y_vl), both [B, L, D]."""
        y, aux = self.encoder(x_BxLxD, mask, spans)
        start = self.vl_from
        h = x_BxLxD if start == 0 else aux[f"block{start - 1:02d}"]
        y_vl, _ = self.encoder(h, mask, spans, start=start, route_vl=True)
        return y, y_vl

    def joint_pass(self, img_BxTxD, txt_BxLxD, ids_BxL):
        """-> (image part [B, T, D], text part [B, L, D], pooled first token [B, D])."""
        t, length = img_BxTxD.shape[1], txt_BxLxD.shape[1]
        valid_txt = ids_BxL != self.pad_id
        valid_img = jnp.ones(img_BxTxD.shape[:2], bool)
        if self.layout == "vlmo":  # VLMo's release: [text ; image]
            x = jnp.concatenate([txt_BxLxD, img_BxTxD], axis=1)
            valid, spans = jnp.concatenate([valid_txt, valid_img], axis=1), (("text", length), ("image", t))
            y, _ = self.encoder(x, padding_mask(valid), spans)
            return y[:, length:], y[:, :length], y[:, 0]
        x = jnp.concatenate([img_BxTxD, txt_BxLxD], axis=1)  # BEiT-3: [image ; text]
        valid, spans = jnp.concatenate([valid_img, valid_txt], axis=1), (("image", t), ("text", length))
        y, _ = self.encoder(x, padding_mask(valid), spans)
        return y[:, :t], y[:, t:], y[:, 0]

    # Heads -------------------------------------------------------------------------
    def image_embedding(self, y_BxTxD):
        return l2_normalize(self.image_proj(y_BxTxD[:, 0]))

    def text_embedding(self, y_BxLxD):
        return l2_normalize(self.text_proj(y_BxLxD[:, 0]))

    def itm_logits(self, pooled_BxD):
        return self.itm_head(pooled_BxD)

    def mlm_logits(self, y_BxLxD):
        return self.mlm_head(y_BxLxD, self.word_embed.attend)

    def mdm_pred(self, y_BxTxD):
        return self.mdm_head(y_BxTxD[:, 1:]).astype(jnp.float32)  # patches only

    # Composite methods (apply with method=) ----------------------------------------
    def image_features(self, image):
        tok = self.image_tokens(image)
        return self.image_embedding(self.image_pass(tok)), tok

    def text_features(self, ids):
        tok = self.text_tokens(ids)
        return self.text_embedding(self.text_pass(tok, ids)), tok

    def image_features_vl(self, image):
        """-> (emb [B, E], VL-FFN emb [B, E], tokens [B, T, D]): both ITC features of
        the image-only pass (itc_vl)."""
        tok = self.image_tokens(image)
        y, y_vl = self._with_vl(tok, None, (("image", tok.shape[1]),))
        return self.image_embedding(y), l2_normalize(self.vl_image_proj(y_vl[:, 0])), tok

    def text_features_vl(self, ids):
        """-> (emb [B, E], VL-FFN emb [B, E], tokens [B, L, D]) of the text-only pass."""
        tok = self.text_tokens(ids)
        y, y_vl = self._with_vl(tok, padding_mask(ids != self.pad_id), (("text", tok.shape[1]),))
        return self.text_embedding(y), l2_normalize(self.vl_text_proj(y_vl[:, 0])), tok

    def fused_features(self, image, ids):
        """The pooled first token of an image-text pass (what ITM reads; VQA heads too): [B, D]."""
        return self.joint_pass(self.image_tokens(image), self.text_tokens(ids), ids)[2]

    def __call__(self, image, ids):
        """Touches every param (init)."""
        img_emb, img_tok = self.image_features(image)
        txt_emb, txt_tok = self.text_features(ids)
        if self.itc_vl:
            self.image_features_vl(image)
            self.text_features_vl(ids)
        y_img, y_txt, pooled = self.joint_pass(img_tok, txt_tok, ids)
        return img_emb, txt_emb, self.itm_logits(pooled), self.mlm_logits(y_txt), self.mdm_pred(y_img)
