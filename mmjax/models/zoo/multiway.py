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

import dataclasses

import jax
import jax.numpy as jnp

from mmjax.flops import layer
from mmjax.models.variants import parse_variant
from mmjax.models.zoo.common import FeatureFamily, logit_scale_bounds
from mmjax.models.zoo.contract import register
from mmjax.models.zoo.multiway_model import Multiway
from mmjax.models.zoo.schema import ComputeConfig, key
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiwayConfig(ComputeConfig):
    """VLMo's and BEiT-3's keys (besides ComputeConfig's; `image` sizes the one tower
    text shares): vl_from (vlmo; None = no VL expert), tasks (() = the layout's
    default), mlm_prob (text of pairs; None = the layout's), tmlm_prob (text alone),
    mdm_ratio, max_logit_scale (t, t_vl projected into [0, ln max] after each update;
    100), mlm_weight (the image-text MLM's weight: VLMo's release 0.25, BEiT-3 1.0),
    itc_vlffn (VLMo's second ITC on VL-FFN features, loss (itc + itc_vlffn) / 2; needs
    vl_from). configs/vlmo.py sets both to the release's; a model config without them
    (a workdir written before they existed) keeps mmjax's earlier objective
    (mlm_weight 1, one ITC), so its checkpoints restore and resume as they were."""

    text_len: int = key(40, derived=True)
    vl_from: int = key(None, none=True)
    tasks: tuple = key(())
    mlm_prob: float = key(None, none=True)
    tmlm_prob: float = key(0.15)
    mdm_ratio: float = key(0.4)
    max_logit_scale: float = key(100.0, none=True)
    mlm_weight: float = key(1.0)
    itc_vlffn: bool = key(False)


@register("vlmo", "beit3")
class MultiwayFamily(FeatureFamily):
    """VLMo (layout 'vlmo') and BEiT-3 (layout 'beit3') for the generic step (keys: MultiwayConfig)."""

    Config = MultiwayConfig
    capabilities = FeatureFamily.capabilities | {"fuse"}
    batch_keys = ("image", "text", "id")
    TASKS = ("itc", "itm", "mlm", "tmlm", "mdm")
    DEFAULTS = {
        "vlmo": dict(tasks=("itc", "itm", "mlm"), mlm_prob=0.15),
        "beit3": dict(tasks=("mlm", "tmlm", "mdm"), mlm_prob=0.5),
    }

    def __init__(self, model_config):
        c = self.Config.parse(model_config)
        family = c.family or "vlmo"
        layout = "beit3" if family == "beit3" else "vlmo"
        defaults = self.DEFAULTS[layout]
        self.config, self.c, self.layout = model_config, c, layout
        self.image_size, self.text_len = c.image_size, c.text_len
        if c.num_frames:
            raise ValueError(f"model.num_frames={c.num_frames}: family {family!r} has no video model (images only)")
        self.tasks = c.tasks or defaults["tasks"]
        bad = [t for t in self.tasks if t not in self.TASKS]
        if bad:
            raise ValueError(f"model.tasks {bad} unknown; valid choices: {', '.join(self.TASKS)}")
        self.mlm_prob = c.mlm_prob or defaults["mlm_prob"]
        self.mlm_kw = c.tokens.mlm(f"model.tasks {self.tasks}") if {"mlm", "tmlm"} & set(self.tasks) else {}
        self.tmlm_prob, self.mdm_ratio, self.mlm_weight = c.tmlm_prob, c.mdm_ratio, c.mlm_weight
        self.max_logit_scale = c.max_logit_scale
        self.t_range = logit_scale_bounds(self.max_logit_scale)
        if not self.mlm_weight >= 0:
            raise ValueError(f"model.mlm_weight={self.mlm_weight!r}; expected a non-negative number")
        self.size = size = parse_variant(c.image, c.image_overrides, kind="image")
        vl_from = c.vl_from if layout == "vlmo" else None
        if layout == "beit3" and c.vl_from is not None:
            raise ValueError(f"model.vl_from={c.vl_from}: family 'beit3' has no VL expert (that is the 'vlmo' layout)")
        if vl_from is not None and not 0 <= vl_from <= size["depth"]:
            raise ValueError(f"model.vl_from={vl_from} must lie in [0, depth {size['depth']}] or be None")
        self.itc_vl = c.itc_vlffn
        if self.itc_vl and vl_from is None:
            raise ValueError(
                f"model.itc_vlffn=True needs VL experts: set model.vl_from (family {family!r}"
                + (", which has none)" if layout == "beit3" else ")")
            )
        self.patch, self.vl_from, self.embed_dim = size["patch"], vl_from, c.embed_dim
        self.model = Multiway(
            size=size,
            image_size=self.image_size,
            vocab_size=c.need("vocab_size"),
            text_len=self.text_len,
            embed_dim=c.embed_dim,
            layout=layout,
            vl_from=vl_from,
            itc_vl=self.itc_vl,
            pad_id=c.tokens.need("pad", "the multiway text embedding"),
            **c.module_kw(),
        )

    def param_bounds(self) -> dict:
        """The log logit scales (t, and t_vl) in [0, ln(model.max_logit_scale)] (open_clip's
        clamp after each step); the forward uses them as they are."""
        return {"t": self.t_range, "t_vl": self.t_range}

    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=identity):
        """-> (loss, metrics, {}): the sum of the configured tasks, the image-text MLM
        weighted by model.mlm_weight, the two ITCs (with itc_vlffn) averaged."""
        del teacher, queues, step
        image, text, ids = batch["image"], batch["text"], batch["id"].astype(jnp.int32)
        r_itm_i, r_itm_t, r_mlm, r_tmlm, r_mdm = jax.random.split(rng, 5)
        loss, metrics = 0.0, {}
        if "itc" in self.tasks or "itm" in self.tasks:
            feats = self._features(params, image, text)
        if "itc" in self.tasks:
            loss, metrics = self._add(loss, metrics, self._itc(params, feats, gather))
        if "itm" in self.tasks:
            loss, metrics = self._add(loss, metrics, self._itm(params, feats, text, ids, (r_itm_i, r_itm_t), gather))
        if "mlm" in self.tasks:
            loss, metrics = self._add(loss, metrics, self._mlm(params, image, text, r_mlm, gather))
        if "tmlm" in self.tasks:
            loss, metrics = self._add(loss, metrics, self._tmlm(params, text, r_tmlm, gather))
        if "mdm" in self.tasks:
            loss, metrics = self._add(loss, metrics, self._mdm(params, image, ids, r_mdm, gather))
        metrics["loss"] = loss
        return loss, metrics, {}

    @staticmethod
    def _add(loss, metrics, task):
        return loss + task[0], {**metrics, **task[1]}

    def _features(self, params, image, text) -> dict:
        """The image-only and text-only passes' embeddings and tokens (+ the VL-FFN
        embeddings when the VL-FFN ITC runs)."""
        m = self.model
        if self.itc_vl and "itc" in self.tasks:
            img_emb, img_vl, img_tok = self._apply(params, m.image_features_vl, image)
            txt_emb, txt_vl, txt_tok = self._apply(params, m.text_features_vl, text)
            return dict(img=img_emb, txt=txt_emb, img_tok=img_tok, txt_tok=txt_tok, img_vl=img_vl, txt_vl=txt_vl)
        img_emb, img_tok = self._apply(params, m.image_features, image)
        txt_emb, txt_tok = self._apply(params, m.text_features, text)
        return dict(img=img_emb, txt=txt_emb, img_tok=img_tok, txt_tok=txt_tok)

    def _itc(self, params, f, gather):
        loss, mi = itc_loss(f["img"], f["txt"], params["t"], gather=gather)
        metrics = {("loss_itc" if k == "loss" else k): v for k, v in mi.items()}
        if "img_vl" in f:  # VLMo's release: (itc + itc_vlffn) * 0.5, own logit scale
            l_vl, mv = itc_loss(f["img_vl"], f["txt_vl"], params["t_vl"], gather=gather)
            loss = 0.5 * (loss + l_vl)
            metrics = {
                **metrics,
                "loss_itc_vlffn": l_vl,
                "logit_scale_vl": mv["logit_scale"],
                "vl_i2t_acc": mv["i2t_acc"],
                "vl_t2i_acc": mv["t2i_acc"],
            }
        return loss, metrics

    def _itm(self, params, f, text, ids, rngs, gather):
        """Negatives from softmax(exp(t) * sim); never the same id or the anchor's own caption text."""
        m = self.model
        neg_txt, neg_img, labels, weights = self.itm_pairs(
            rngs, f["img"], f["txt"], ids, jnp.exp(-params["t"]), gather, text=text
        )
        img_tok, txt_tok = f["img_tok"], f["txt_tok"]
        txt_all, text_all, img_all = gather(txt_tok), gather(text), gather(img_tok)
        _, _, pooled = self._apply(
            params,
            m.joint_pass,
            jnp.concatenate([img_tok, img_tok, img_all[neg_img]]),
            jnp.concatenate([txt_tok, txt_all[neg_txt], txt_tok]),
            jnp.concatenate([text, text_all[neg_txt], text]),
        )
        return itm_loss(self._apply(params, m.itm_logits, pooled), labels, weights, gather=gather)

    def _masked(self, rng, text, prob, gather):
        """Masked text and MLM targets, drawn for the global batch, then this call's rows (pmap == jit)."""
        drawn = mask_tokens(
            rng,
            gather(text),
            vocab_size=self.model.vocab_size,
            prob=prob,
            **self.mlm_kw,
        )
        return local(gather, drawn)

    def _mlm(self, params, image, text, rng, gather):
        m = self.model
        masked, target = self._masked(rng, text, self.mlm_prob, gather)
        img_tok = self._apply(params, m.image_tokens, image)
        _, y_txt, _ = self._apply(params, m.joint_pass, img_tok, self._apply(params, m.text_tokens, masked), masked)
        loss, mi = mlm_loss(self._apply(params, m.mlm_logits, y_txt), text, target, gather=gather)
        return self.mlm_weight * loss, mi

    def _tmlm(self, params, text, rng, gather):
        m = self.model
        masked, target = self._masked(rng, text, self.tmlm_prob, gather)
        y = self._apply(params, m.text_pass, self._apply(params, m.text_tokens, masked), masked)
        loss, mi = mlm_loss(self._apply(params, m.mlm_logits, y), text, target, gather=gather)
        rename = {"loss_mlm": "loss_tmlm", "mlm_acc": "tmlm_acc"}
        return loss, {rename.get(k, k): v for k, v in mi.items()}

    def _mdm(self, params, image, ids, rng, gather):
        m = self.model
        grid = self.image_size // self.patch
        pmask = local(gather, blockwise_mask(rng, gather(ids).shape[0], grid, grid, self.mdm_ratio))
        y = self._apply(params, m.image_pass, self._apply(params, m.image_tokens, image, pmask))
        return mdm_loss(self._apply(params, m.mdm_pred, y), patch_targets(image, self.patch), pmask, gather=gather)

    # FLOPs per sample (mmjax/flops.py) ---------------------------------------------------
    def _passes(self) -> dict:
        s, length = self.size, self.text_len
        d, m, p = s["width"], s["mlp_dim"], s["patch"]
        n = (self.image_size // p) ** 2
        return dict(
            patch=2 * n * p * p * 3 * d,
            image=s["depth"] * layer(n + 1, d, m),
            text=s["depth"] * layer(length, d, m),
            joint=s["depth"] * layer(n + 1 + length, d, m),
            mlm_head=2 * length * (d * d + d * self.model.vocab_size),
            mdm_head=2 * n * d * p * p * 3,
        )

    def image_flops(self) -> int:
        f = self._passes()
        return f["patch"] + f["image"] + 2 * self.size["width"] * self.embed_dim

    def fused_flops(self) -> tuple:
        """-> (fused_features' forward FLOPs per sample: the joint pass, its width D)."""
        f = self._passes()
        return f["patch"] + f["joint"], self.size["width"]

    def flops(self, batch: int) -> dict:
        """Per task: itc: image-only and text-only passes + projections + logits (the
        VL-FFN ITC: the top depth - vl_from layers again on both passes + two projections
        + logits); itm: similarities + 3 joint passes over T+L tokens + head; mlm: a
        joint pass + MLM head; tmlm: a text pass + MLM head; mdm: an image pass + MDM
        head. (Experts do not change the count: every token goes through one FFN.)"""
        f, s, e, tasks = self._passes(), self.size, self.embed_dim, self.tasks
        d, m, out = s["width"], s["mlp_dim"], 0
        if "itc" in tasks or "itm" in tasks:
            out += f["patch"] + f["image"] + f["text"] + 2 * 2 * d * e
        if "itc" in tasks:
            out += 2 * 2 * batch * e
            if self.itc_vl:
                n = (self.image_size // s["patch"]) ** 2
                top = s["depth"] - self.vl_from
                out += top * (layer(n + 1, d, m) + layer(self.text_len, d, m)) + 2 * 2 * d * e + 2 * 2 * batch * e
        if "itm" in tasks:
            out += 2 * 2 * batch * e + 3 * (f["joint"] + 2 * d * 2)
        if "mlm" in tasks:
            out += f["patch"] + f["joint"] + f["mlm_head"]
        if "tmlm" in tasks:
            out += f["text"] + f["mlm_head"]
        if "mdm" in tasks:
            out += f["patch"] + f["image"] + f["mdm_head"]
        return {"student": out, "teacher": 0}

    def fused_features(self, params, image, text):
        """The pooled first token of an image-text pass (what ITM and a VQA head read): [B, D]."""
        return self._apply(params, self.model.fused_features, image, text)

    # Evaluation: FeatureFamily ranks by the dual encoder; ITM re-ranks by a joint pass
    def itm_scores(self, params, image_tokens, text_tokens, text):
        _, _, pooled = self._apply(params, self.model.joint_pass, image_tokens, text_tokens, text)
        logits = self._apply(params, self.model.itm_logits, pooled)
        return logits[:, 1] - logits[:, 0]
