"""Contrastive objectives over L2-normalised embeddings: softmax ITC and SigLIP.

Shape letters: b local batch (rows this call owns), B global batch, D embed dim.

Gather semantics (the same for both losses)
-------------------------------------------
`gather` maps a local `[b, D]` array to the global `[B, D]` one.
* Under `jax.jit` on a mesh the arrays are already global (b = B) and `gather`
  is the identity: the result is the global loss.
* Under `jax.pmap(axis_name='data')` pass
  `gather=lambda x: jax.lax.all_gather(x, 'data', tiled=True)`. Each device then
  scores its own b rows against all B gathered columns and returns the mean
  over its local rows. Devices own equal-sized slices, so the mean over devices
  (`lax.pmean(loss, 'data')`) equals the global loss exactly. The positive of a
  local row is its own local partner, so no device index is needed.
  Gradients: `all_gather` transposes to a sum over devices, so the gradient on
  each device is (N devices) x its share; `lax.pmean` of the per-device
  gradients (what a pmap step does anyway) equals the global gradient.
"""
import jax
import jax.numpy as jnp
import chex

from mmjax.parallel.collective import identity  # noqa: F401  (re-exported)


def _scale(log_scale, max_scale):
  # min(exp(t), max): gradient flows to t below the clamp and is 0 above it.
  return jnp.minimum(jnp.exp(jnp.asarray(log_scale, jnp.float32)), max_scale)


def _check(img, txt):
  chex.assert_rank([img, txt], 2)
  chex.assert_equal_shape([img, txt])
  return img.astype(jnp.float32), txt.astype(jnp.float32)


def _neg_logits(img, txt_neg):
  """Scores of each local image against its own K hard-negative texts.

  img: [b, D]; txt_neg: [b, K, D] (L2-normalised) -> [b, K].
  """
  chex.assert_rank(txt_neg, 3)
  chex.assert_equal(txt_neg.shape[0], img.shape[0])
  return jnp.einsum("bd,bkd->bk", img, txt_neg.astype(jnp.float32))


def itc_loss(img, txt, log_scale, *, txt_neg=None, gather=identity, max_scale=100.0):
  """Symmetric softmax image-text contrastive loss (CLIP).

  Args:
    img: [b, D] L2-normalised image embeddings (local rows).
    txt: [b, D] L2-normalised text embeddings; row i pairs with img row i.
    log_scale: scalar t; logit scale = min(exp(t), max_scale).
    txt_neg: optional [b, K, D] hard-negative captions of each image (NegCLIP:
      the same words with attributes swapped). They join image i's candidates in
      the image->text direction only; they are local, so need no gather.
    gather: local [b, D] -> global [B, D] (see the module docstring).
  Returns:
    (loss, metrics): loss = mean over local rows of (CE_i2t + CE_t2i) / 2 with
    the B global candidates (+ K hard negatives for i2t); metrics: loss, logit_scale, i2t_acc, t2i_acc
    (the positive scores at least as high as every candidate).
  """
  img, txt = _check(img, txt)
  scale = _scale(log_scale, max_scale)
  img_all_BxD, txt_all_BxD = gather(img), gather(txt)
  chex.assert_rank([img_all_BxD, txt_all_BxD], 2)
  pos_b = scale * jnp.sum(img * txt, axis=-1)
  logits_i2t_bxB = scale * img @ txt_all_BxD.T
  logits_t2i_bxB = scale * txt @ img_all_BxD.T
  if txt_neg is not None:
    logits_i2t_bxB = jnp.concatenate([logits_i2t_bxB, scale * _neg_logits(img, txt_neg)], axis=-1)
  ce_i2t_b = jax.nn.logsumexp(logits_i2t_bxB, axis=-1) - pos_b
  ce_t2i_b = jax.nn.logsumexp(logits_t2i_bxB, axis=-1) - pos_b
  loss = 0.5 * (jnp.mean(ce_i2t_b) + jnp.mean(ce_t2i_b))
  # Compare against a recomputed positive so ties with itself count as correct.
  acc_i2t = jnp.mean(jnp.max(logits_i2t_bxB, axis=-1) <= pos_b + 1e-6 * scale)
  acc_t2i = jnp.mean(jnp.max(logits_t2i_bxB, axis=-1) <= pos_b + 1e-6 * scale)
  metrics = dict(loss=loss, logit_scale=scale, i2t_acc=acc_i2t, t2i_acc=acc_t2i)
  return loss, metrics


def sigmoid_loss(img, txt, log_scale, bias, *, txt_neg=None, gather=identity, max_scale=None):
  """SigLIP pairwise sigmoid loss.

  loss = mean_i sum_j -log sigmoid(z_ij (t <x_i, y_j> + b)), z = +1 if j == i
  else -1, over local image rows i and all B gathered texts j.

  Args:
    img: [b, D] L2-normalised image embeddings (local rows).
    txt: [b, D] L2-normalised text embeddings; row i pairs with img row i.
    log_scale: scalar t'; t = exp(t') (clamped at max_scale if given).
    bias: scalar b.
    txt_neg: optional [b, K, D] hard-negative captions of each image; each adds
      a z = -1 term to its image's row.
    gather: local [b, D] -> global [B, D] (see the module docstring).
  Returns:
    (loss, metrics): metrics: loss, logit_scale, logit_bias, i2t_acc, t2i_acc
    (t2i_acc over local texts vs gathered images).
  """
  img, txt = _check(img, txt)
  t = jnp.exp(jnp.asarray(log_scale, jnp.float32))
  if max_scale is not None:
    t = jnp.minimum(t, max_scale)
  bias = jnp.asarray(bias, jnp.float32)
  txt_all_BxD = gather(txt)
  chex.assert_rank(txt_all_BxD, 2)
  logits_bxB = t * img @ txt_all_BxD.T + bias
  pos_b = t * jnp.sum(img * txt, axis=-1) + bias
  # Treat every pair as negative, then swap the positive's term:
  # -log sig(-l) summed over j, minus -log sig(-l_ii), plus -log sig(l_ii).
  neg_b = jnp.sum(-jax.nn.log_sigmoid(-logits_bxB), axis=-1)
  per_row_b = neg_b + jax.nn.log_sigmoid(-pos_b) - jax.nn.log_sigmoid(pos_b)
  if txt_neg is not None:
    hard_bxK = t * _neg_logits(img, txt_neg) + bias
    per_row_b = per_row_b + jnp.sum(-jax.nn.log_sigmoid(-hard_bxK), axis=-1)
  loss = jnp.mean(per_row_b)
  acc_i2t = jnp.mean(jnp.max(logits_bxB, axis=-1) <= pos_b + 1e-6 * t)
  img_all_BxD = gather(img)
  logits_t2i_bxB = t * txt @ img_all_BxD.T + bias
  acc_t2i = jnp.mean(jnp.max(logits_t2i_bxB, axis=-1) <= pos_b + 1e-6 * t)
  metrics = dict(loss=loss, logit_scale=t, logit_bias=bias,
                 i2t_acc=acc_i2t, t2i_acc=acc_t2i)
  return loss, metrics
