"""VLMo and BEiT-3: one multiway transformer for images, text and image-text pairs.

Shape letters: B batch, T image tokens ([CLS] + N patches), N patches, L text
length, D width, E embed dim, V vocabulary, K pixels per patch (P*P*3).

One `MultiwayEncoder` (shared attention, per-modality experts; MODELS.md) runs
  image-only  [CLS_img ; patches]      -> image [CLS] -> ITC embedding (dual encoder)
  text-only   [bos ; words]            -> text [CLS] (bos) -> ITC embedding
  image-text  VLMo [text ; image], BEiT-3 [image ; text] -> the first token -> ITM
with the same params. Layouts: 'vlmo' (shared attention + V/L experts, a VL expert
from `vl_from` up) and 'beit3' (the released decoupled layout: per-modality q/k/v,
output projections, norms and FFNs; only the attention computation is shared).

Tasks (any subset, chosen per training stage by config):
  itc   softmax contrastive over the global batch (image-only and text-only passes);
        VLMo's release adds a second ITC on the VL-FFN features (the top blocks run
        again from `vl_from` with the VL expert, own projections `vl_image_proj` /
        `vl_text_proj` and logit scale `t_vl`): (itc + itc_vlffn) / 2
        (model.itc_vlffn; configs/vlmo.py turns it on)
  itm   image-text matching with hard negatives drawn over the global batch
  mlm   masked language modeling of the text in an image-text pass (VLMo 15%,
        BEiT-3 50% of the text of a pair), weighted by model.mlm_weight (VLMo's
        release and configs/vlmo.py: 0.25; BEiT-3: 1)
  tmlm  masked language modeling on text alone (VLMo stage 2; BEiT-3's text data)
  mdm   masked data modeling on images alone: block-wise 40% of patches replaced
        by a learned [MASK] token, regressing normalised pixels (the MAE-style
        stand-in for BEiT-3's visual tokens; VLMo stage 1)
VLMo's stage-wise pretraining is `train.stages` in configs/vlmo.py.
"""

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import padding_mask
from mmjax.models.embed import PatchEmbed, WordEmbed
from mmjax.models.fusion import ItmHead, MlmHead, head_dense
from mmjax.models.multiway import MultiwayEncoder
from mmjax.models.transformer import remat_mode
from mmjax.models.variants import parse_variant
from mmjax.models.zoo.clip import DTYPES, l2_normalize
from mmjax.models.zoo.common import FeatureFamily, attention_spec, logit_scale_bounds
from mmjax.objectives import (
    blockwise_mask,
    identity,
    itc_loss,
    itm_loss,
    mask_tokens,
    mdm_loss,
    mlm_loss,
    patch_targets,
)
from mmjax.parallel.collective import local
from mmjax.parallel.sharding import dense_init, names

Dtype = Any
MASK_ID, SPECIAL_IDS, FIRST_WORD_ID, PAD_ID = 4, (0, 1, 2, 3, 4, 5), 6, 0


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
        mask = padding_mask(ids_BxL != PAD_ID)
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
        valid_txt = ids_BxL != PAD_ID
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
        y, y_vl = self._with_vl(tok, padding_mask(ids != PAD_ID), (("text", tok.shape[1]),))
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


class MultiwayFamily(FeatureFamily):
    """VLMo (layout 'vlmo') and BEiT-3 (layout 'beit3') for the generic step.

    model_config: family ('vlmo'|'beit3'), image (size/patch, e.g. 'mu/8'; text shares
    the tower), image_overrides, embed_dim, vl_from (vlmo; None = no VL expert),
    tasks, mlm_prob (text of pairs), tmlm_prob (text alone), mdm_ratio,
    max_logit_scale (t, t_vl projected into [0, ln max] after each update; 100),
    mlm_weight (the image-text MLM's weight: VLMo's release 0.25, BEiT-3 1.0),
    itc_vlffn (VLMo's second ITC on VL-FFN features, loss (itc + itc_vlffn) / 2;
    needs vl_from). configs/vlmo.py sets both to the release's; a model config
    without them (a workdir written before they existed) keeps mmjax's earlier
    objective (mlm_weight 1, one ITC), so its checkpoints restore and resume as they were.
    """

    batch_keys = ("image", "text", "id")
    TASKS = ("itc", "itm", "mlm", "tmlm", "mdm")
    DEFAULTS = {
        "vlmo": dict(tasks=("itc", "itm", "mlm"), mlm_prob=0.15),
        "beit3": dict(tasks=("mlm", "tmlm", "mdm"), mlm_prob=0.5),
    }

    def __init__(self, model_config):
        cfg = model_config
        family = cfg.get("family", "vlmo")
        layout = "beit3" if family == "beit3" else "vlmo"
        defaults = self.DEFAULTS[layout]
        self.config, self.layout = cfg, layout
        self.image_size = int(cfg.get("image_size", 224))
        self.text_len = int(cfg.get("text_len", 40))
        tasks = tuple(cfg.get("tasks", None) or defaults["tasks"])
        bad = [t for t in tasks if t not in self.TASKS]
        if bad:
            raise ValueError(f"model.tasks {bad} unknown; valid choices: {', '.join(self.TASKS)}")
        self.tasks = tasks
        self.mlm_prob = float(cfg.get("mlm_prob", None) or defaults["mlm_prob"])
        self.tmlm_prob = float(cfg.get("tmlm_prob", 0.15))
        self.mdm_ratio = float(cfg.get("mdm_ratio", 0.4))
        max_scale = cfg.get("max_logit_scale", 100.0)
        self.max_logit_scale = None if max_scale is None else float(max_scale)
        self.t_range = logit_scale_bounds(self.max_logit_scale)
        mlm_weight = cfg.get("mlm_weight", None)
        self.mlm_weight = 1.0 if mlm_weight is None else float(mlm_weight)
        if not self.mlm_weight >= 0:
            raise ValueError(f"model.mlm_weight={self.mlm_weight!r}; expected a non-negative number")
        size = parse_variant(cfg.image, cfg.get("image_overrides", None), kind="image")
        vl_from = cfg.get("vl_from", None) if layout == "vlmo" else None
        if vl_from is not None and not 0 <= int(vl_from) <= size["depth"]:
            raise ValueError(f"model.vl_from={vl_from} must lie in [0, depth {size['depth']}] or be None")
        self.itc_vl = bool(cfg.get("itc_vlffn", None) or False)
        if self.itc_vl and vl_from is None:
            raise ValueError(
                f"model.itc_vlffn=True needs VL experts: set model.vl_from (family {family!r}"
                + (", which has none)" if layout == "beit3" else ")")
            )
        self.patch = size["patch"]
        self.model = Multiway(
            size=size,
            image_size=self.image_size,
            vocab_size=int(cfg.vocab_size),
            text_len=self.text_len,
            embed_dim=int(cfg.embed_dim),
            layout=layout,
            vl_from=None if vl_from is None else int(vl_from),
            itc_vl=self.itc_vl,
            remat=remat_mode(cfg.get("remat", False)),
            attention=attention_spec(cfg),
            dtype=DTYPES[cfg.get("dtype", "float32")],
            param_dtype=DTYPES[cfg.get("param_dtype", None) or "float32"],
        )

    def param_bounds(self) -> dict:
        """The log logit scales (t, and t_vl) in [0, ln(model.max_logit_scale)] (open_clip's
        clamp after each step); the forward uses them as they are."""
        return {"t": self.t_range, "t_vl": self.t_range}

    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=identity):
        """-> (loss, metrics, {}): the sum of the configured tasks, the image-text MLM
        weighted by model.mlm_weight, the two ITCs (with itc_vlffn) averaged."""
        del teacher, queues, step
        m = self.model
        image, text, ids = batch["image"], batch["text"], batch["id"].astype(jnp.int32)
        r_itm_i, r_itm_t, r_mlm, r_tmlm, r_mdm = jax.random.split(rng, 5)
        loss, metrics = 0.0, {}

        itc_vl = self.itc_vl and "itc" in self.tasks
        if itc_vl:
            img_emb, img_vl, img_tok = self._apply(params, m.image_features_vl, image)
            txt_emb, txt_vl, txt_tok = self._apply(params, m.text_features_vl, text)
        elif "itc" in self.tasks or "itm" in self.tasks:
            img_emb, img_tok = self._apply(params, m.image_features, image)
            txt_emb, txt_tok = self._apply(params, m.text_features, text)
        if "itc" in self.tasks:
            l, mi = itc_loss(img_emb, txt_emb, params["t"], gather=gather)
            metrics = {**metrics, **{("loss_itc" if k == "loss" else k): v for k, v in mi.items()}}
            if itc_vl:  # VLMo's release: (itc + itc_vlffn) * 0.5, own logit scale
                l_vl, mv = itc_loss(img_vl, txt_vl, params["t_vl"], gather=gather)
                l = 0.5 * (l + l_vl)
                metrics = {
                    **metrics,
                    "loss_itc_vlffn": l_vl,
                    "logit_scale_vl": mv["logit_scale"],
                    "vl_i2t_acc": mv["i2t_acc"],
                    "vl_t2i_acc": mv["t2i_acc"],
                }
            loss = loss + l
        if "itm" in self.tasks:
            # Negatives from softmax(exp(t) * sim); never the same id or the anchor's own caption text.
            neg_txt, neg_img, labels, weights = self.itm_pairs(
                (r_itm_i, r_itm_t), img_emb, txt_emb, ids, jnp.exp(-params["t"]), gather, text=text
            )
            txt_all, text_all, img_all = gather(txt_tok), gather(text), gather(img_tok)
            _, _, pooled = self._apply(
                params,
                m.joint_pass,
                jnp.concatenate([img_tok, img_tok, img_all[neg_img]]),
                jnp.concatenate([txt_tok, txt_all[neg_txt], txt_tok]),
                jnp.concatenate([text, text_all[neg_txt], text]),
            )
            logits = self._apply(params, m.itm_logits, pooled)
            l, mi = itm_loss(logits, labels, weights, gather=gather)
            loss, metrics = loss + l, {**metrics, **mi}
        if "mlm" in self.tasks:
            masked, target = local(
                gather,
                mask_tokens(  # global draw, local rows (pmap == jit)
                    r_mlm,
                    gather(text),
                    vocab_size=m.vocab_size,
                    mask_id=MASK_ID,
                    special_ids=SPECIAL_IDS,
                    prob=self.mlm_prob,
                    first_random_id=FIRST_WORD_ID,
                ),
            )
            img_tok = self._apply(params, m.image_tokens, image)
            _, y_txt, _ = self._apply(params, m.joint_pass, img_tok, self._apply(params, m.text_tokens, masked), masked)
            l, mi = mlm_loss(self._apply(params, m.mlm_logits, y_txt), text, target, gather=gather)
            loss, metrics = loss + self.mlm_weight * l, {**metrics, **mi}
        if "tmlm" in self.tasks:
            masked, target = local(
                gather,
                mask_tokens(
                    r_tmlm,
                    gather(text),
                    vocab_size=m.vocab_size,
                    mask_id=MASK_ID,
                    special_ids=SPECIAL_IDS,
                    prob=self.tmlm_prob,
                    first_random_id=FIRST_WORD_ID,
                ),
            )
            y = self._apply(params, m.text_pass, self._apply(params, m.text_tokens, masked), masked)
            l, mi = mlm_loss(self._apply(params, m.mlm_logits, y), text, target, gather=gather)
            loss = loss + l
            metrics = {
                **metrics,
                **{("loss_tmlm" if k == "loss_mlm" else "tmlm_acc" if k == "mlm_acc" else k): v for k, v in mi.items()},
            }
        if "mdm" in self.tasks:
            grid = self.image_size // self.patch
            n_global = gather(ids).shape[0]
            pmask = local(gather, blockwise_mask(r_mdm, n_global, grid, grid, self.mdm_ratio))
            y = self._apply(params, m.image_pass, self._apply(params, m.image_tokens, image, pmask))
            l, mi = mdm_loss(self._apply(params, m.mdm_pred, y), patch_targets(image, self.patch), pmask, gather=gather)
            loss, metrics = loss + l, {**metrics, **mi}
        metrics["loss"] = loss
        return loss, metrics, {}

    # Evaluation: FeatureFamily ranks by the dual encoder; ITM re-ranks by a joint pass
    def itm_scores(self, params, image_tokens, text_tokens, text):
        _, _, pooled = self._apply(params, self.model.joint_pass, image_tokens, text_tokens, text)
        logits = self._apply(params, self.model.itm_logits, pooled)
        return logits[:, 1] - logits[:, 0]
