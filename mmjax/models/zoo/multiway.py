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
  itc   softmax contrastive over the global batch (image-only and text-only passes)
  itm   image-text matching with hard negatives drawn over the global batch
  mlm   masked language modeling of the text in an image-text pass (VLMo 15%,
        BEiT-3 50% of the text of a pair)
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
from mmjax.models.fusion import ItmHead, MlmHead
from mmjax.models.multiway import MultiwayEncoder
from mmjax.models.transformer import remat_mode
from mmjax.models.variants import parse_variant
from mmjax.models.zoo.common import FeatureFamily, attention_spec
from mmjax.models.zoo.clip import DTYPES, l2_normalize
from mmjax.parallel.collective import local
from mmjax.parallel.sharding import dense_init, names
from mmjax.objectives import (blockwise_mask, identity, itc_loss, itm_loss, mask_tokens, mdm_loss,
                              mlm_loss, patch_targets, sample_hard_negatives)

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
    self.image_cls = self.param("image_cls", names(nn.initializers.zeros, None, None, "embed"), (1, 1, s["width"]),
                                self.param_dtype)
    self.image_pos = self.param("image_pos", names(nn.initializers.normal(0.02), None, None, "embed"), (1, n + 1, s["width"]),
                                self.param_dtype)
    self.mask_token = self.param("mask_token", names(nn.initializers.normal(0.02), None, None, "embed"), (1, 1, s["width"]),
                                 self.param_dtype)
    self.word_embed = WordEmbed(self.vocab_size, s["width"], self.text_len, **kw)
    self.encoder = MultiwayEncoder(s["depth"], s["heads"], s["mlp_dim"], layout=self.layout,
                                   vl_from=self.vl_from, remat=self.remat, attention=self.attention, **kw)
    self.image_proj = nn.Dense(self.embed_dim, use_bias=False, **kw, **dense_init("embed", None))
    self.text_proj = nn.Dense(self.embed_dim, use_bias=False, **kw, **dense_init("embed", None))
    self.itm_head = ItmHead(**kw)
    self.mlm_head = MlmHead(self.vocab_size, **kw)
    self.mdm_head = nn.Dense(s["patch"] ** 2 * 3, **kw, **dense_init("embed", None))
    self.t = self.param("t", names(nn.initializers.constant(math.log(1 / 0.07))), (), jnp.float32)

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

  def fused_features(self, image, ids):
    """The pooled first token of an image-text pass (what ITM reads; VQA heads too): [B, D]."""
    return self.joint_pass(self.image_tokens(image), self.text_tokens(ids), ids)[2]

  def __call__(self, image, ids):
    """Touches every param (init)."""
    img_emb, img_tok = self.image_features(image)
    txt_emb, txt_tok = self.text_features(ids)
    y_img, y_txt, pooled = self.joint_pass(img_tok, txt_tok, ids)
    return img_emb, txt_emb, self.itm_logits(pooled), self.mlm_logits(y_txt), self.mdm_pred(y_img)


class MultiwayFamily(FeatureFamily):
  """VLMo (layout 'vlmo') and BEiT-3 (layout 'beit3') for the generic step.

  model_config: family ('vlmo'|'beit3'), image (size/patch, e.g. 'mu/8'; text shares
  the tower), image_overrides, embed_dim, vl_from (vlmo; None = no VL expert),
  tasks, mlm_prob (text of pairs), tmlm_prob (text alone), mdm_ratio, max_logit_scale.
  """
  batch_keys = ("image", "text", "id")
  TASKS = ("itc", "itm", "mlm", "tmlm", "mdm")
  DEFAULTS = {"vlmo": dict(tasks=("itc", "itm", "mlm"), mlm_prob=0.15),
              "beit3": dict(tasks=("mlm", "tmlm", "mdm"), mlm_prob=0.5)}

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
    self.max_logit_scale = float(cfg.get("max_logit_scale", 100.0))
    size = parse_variant(cfg.image, cfg.get("image_overrides", None), kind="image")
    vl_from = cfg.get("vl_from", None) if layout == "vlmo" else None
    if vl_from is not None and not 0 <= int(vl_from) <= size["depth"]:
      raise ValueError(f"model.vl_from={vl_from} must lie in [0, depth {size['depth']}] or be None")
    self.patch = size["patch"]
    self.model = Multiway(size=size, image_size=self.image_size, vocab_size=int(cfg.vocab_size),
                          text_len=self.text_len, embed_dim=int(cfg.embed_dim), layout=layout,
                          vl_from=None if vl_from is None else int(vl_from),
                          remat=remat_mode(cfg.get("remat", False)), attention=attention_spec(cfg),
                          dtype=DTYPES[cfg.get("dtype", "float32")],
                          param_dtype=DTYPES[cfg.get("param_dtype", None) or "float32"])


  def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None,
                gather=identity):
    """-> (loss, metrics, {}): the unweighted sum of the configured tasks."""
    del teacher, queues, step
    m = self.model
    image, text, ids = batch["image"], batch["text"], batch["id"].astype(jnp.int32)
    r_itm_i, r_itm_t, r_mlm, r_tmlm, r_mdm = jax.random.split(rng, 5)
    loss, metrics = 0.0, {}

    if "itc" in self.tasks or "itm" in self.tasks:
      img_emb, img_tok = self._apply(params, m.image_features, image)
      txt_emb, txt_tok = self._apply(params, m.text_features, text)
    if "itc" in self.tasks:
      l, mi = itc_loss(img_emb, txt_emb, params["t"], gather=gather, max_scale=self.max_logit_scale)
      loss, metrics = loss + l, {**metrics, **{("loss_itc" if k == "loss" else k): v for k, v in mi.items()}}
    if "itm" in self.tasks:
      scale = jnp.minimum(jnp.exp(params["t"]), self.max_logit_scale)
      ids_all = gather(ids)
      sim_i2t = jax.lax.stop_gradient(scale * img_emb @ gather(txt_emb).T)
      sim_t2i = jax.lax.stop_gradient(scale * txt_emb @ gather(img_emb).T)
      neg_txt, has_t = sample_hard_negatives(r_itm_i, sim_i2t, ids, ids_all, gather=gather)
      neg_img, has_i = sample_hard_negatives(r_itm_t, sim_t2i, ids, ids_all, gather=gather)
      txt_all, text_all, img_all = gather(txt_tok), gather(text), gather(img_tok)
      b = image.shape[0]
      _, _, pooled = self._apply(
          params, m.joint_pass, jnp.concatenate([img_tok, img_tok, img_all[neg_img]]),
          jnp.concatenate([txt_tok, txt_all[neg_txt], txt_tok]),
          jnp.concatenate([text, text_all[neg_txt], text]))
      logits = self._apply(params, m.itm_logits, pooled)
      labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
      weights = jnp.concatenate([jnp.ones((b,)), has_t.astype(jnp.float32), has_i.astype(jnp.float32)])
      l, mi = itm_loss(logits, labels, weights, gather=gather)
      loss, metrics = loss + l, {**metrics, **mi}
    if "mlm" in self.tasks:
      masked, target = local(gather, mask_tokens(  # global draw, local rows (pmap == jit)
          r_mlm, gather(text), vocab_size=m.vocab_size, mask_id=MASK_ID, special_ids=SPECIAL_IDS,
          prob=self.mlm_prob, first_random_id=FIRST_WORD_ID))
      img_tok = self._apply(params, m.image_tokens, image)
      _, y_txt, _ = self._apply(params, m.joint_pass, img_tok, self._apply(params, m.text_tokens, masked),
                                masked)
      l, mi = mlm_loss(self._apply(params, m.mlm_logits, y_txt), text, target, gather=gather)
      loss, metrics = loss + l, {**metrics, **mi}
    if "tmlm" in self.tasks:
      masked, target = local(gather, mask_tokens(
          r_tmlm, gather(text), vocab_size=m.vocab_size, mask_id=MASK_ID, special_ids=SPECIAL_IDS,
          prob=self.tmlm_prob, first_random_id=FIRST_WORD_ID))
      y = self._apply(params, m.text_pass, self._apply(params, m.text_tokens, masked), masked)
      l, mi = mlm_loss(self._apply(params, m.mlm_logits, y), text, target, gather=gather)
      loss = loss + l
      metrics = {**metrics, **{("loss_tmlm" if k == "loss_mlm" else "tmlm_acc" if k == "mlm_acc" else k): v
                               for k, v in mi.items()}}
    if "mdm" in self.tasks:
      grid = self.image_size // self.patch
      n_global = gather(ids).shape[0]
      pmask = local(gather, blockwise_mask(r_mdm, n_global, grid, grid, self.mdm_ratio))
      y = self._apply(params, m.image_pass, self._apply(params, m.image_tokens, image, pmask))
      l, mi = mdm_loss(self._apply(params, m.mdm_pred, y), patch_targets(image, self.patch), pmask,
                       gather=gather)
      loss, metrics = loss + l, {**metrics, **mi}
    metrics["loss"] = loss
    return loss, metrics, {}

  # Evaluation: FeatureFamily ranks by the dual encoder; ITM re-ranks by a joint pass
  def itm_scores(self, params, image_tokens, text_tokens, text):
    _, _, pooled = self._apply(params, self.model.joint_pass, image_tokens, text_tokens, text)
    logits = self._apply(params, self.model.itm_logits, pooled)
    return logits[:, 1] - logits[:, 0]
