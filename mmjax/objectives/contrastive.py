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

import chex
import jax
import jax.numpy as jnp

from mmjax.parallel.collective import identity  # noqa: F401  (re-exported)

NEG_SCOPES = ("batch", "own")
# Logit of a masked-out candidate: finite, so softmax gives it exactly 0 and no
# inf - inf appears in the gradient.
_NEG = -1e9


def _scale(log_scale, max_scale=None):
    """exp(t) in float32, the parameter used as it is: families keep t in range by
    projecting it after each update (`project_params`). `max_scale` clips the forward
    value only (its gradient is 0 beyond it); the families do not use it."""
    scale = jnp.exp(jnp.asarray(log_scale, jnp.float32))
    return scale if max_scale is None else jnp.minimum(scale, max_scale)


def _check(img, txt):
    chex.assert_rank([img, txt], 2)
    chex.assert_equal_shape([img, txt])
    return img.astype(jnp.float32), txt.astype(jnp.float32)


def _hard_negatives(img, txt_neg, neg_valid, neg_scope, gather):
    """Similarities of each local image to the hard-negative captions, and which count.

    img: [b, D]; txt_neg: [b, K, D] (L2-normalised); neg_valid: [b, K] (bool or 0/1;
    None = all valid; False = a cycled repeat or padding, never scored).
    neg_scope 'batch' (NegCLIP): every image against all B*K captions of the global
    batch (gathered like the texts) -> [b, B*K]; 'own': each image against its own K
    -> [b, K]. Returns (sim, valid) of that shape, sim in float32.
    """
    if neg_scope not in NEG_SCOPES:
        raise ValueError(f"hard-negative scope {neg_scope!r}; valid choices: {', '.join(NEG_SCOPES)}")
    chex.assert_rank(txt_neg, 3)
    chex.assert_equal(txt_neg.shape[0], img.shape[0])
    b, k, d = txt_neg.shape
    valid_bxK = jnp.ones((b, k), jnp.float32) if neg_valid is None else jnp.asarray(neg_valid).astype(jnp.float32)
    chex.assert_shape(valid_bxK, (b, k))
    txt_neg = txt_neg.astype(jnp.float32)
    if neg_scope == "own":
        return jnp.einsum("bd,bkd->bk", img, txt_neg), valid_bxK > 0.5
    neg_all_BKxD = gather(txt_neg).reshape(-1, d)
    valid_BK = gather(valid_bxK).reshape(-1) > 0.5
    return img @ neg_all_BKxD.T, jnp.broadcast_to(valid_BK[None, :], (b, valid_BK.shape[0]))


def itc_loss(img, txt, log_scale, *, txt_neg=None, neg_valid=None, neg_scope="batch", gather=identity, max_scale=None):
    """Symmetric softmax image-text contrastive loss (CLIP).

    Args:
      img: [b, D] L2-normalised image embeddings (local rows).
      txt: [b, D] L2-normalised text embeddings; row i pairs with img row i.
      log_scale: scalar t; logit scale = exp(t), t used as it is (the family
        projects it into range after each update).
      txt_neg: optional [b, K, D] hard-negative captions of each image (NegCLIP:
        the same words with attributes swapped). They join the candidates in the
        image->text direction only. neg_scope='batch' (NegCLIP's method): every
        image is scored against all B texts and all B*K hard captions of the global
        batch (gathered like the texts): B x (B + B*K); 'own': against its own K only.
      neg_valid: optional [b, K] bool, False for a hard caption that must not count
        (a cycled repeat, padding); None = all valid.
      gather: local [b, D] -> global [B, D] (see the module docstring).
      max_scale: optional clip of the forward scale (zero gradient beyond it).
    Returns:
      (loss, metrics): loss = mean over local rows of (CE_i2t + CE_t2i) / 2 with
      the B global candidates (+ the valid hard negatives for i2t); metrics: loss,
      logit_scale, i2t_acc, t2i_acc (the positive scores at least as high as every
      candidate).
    """
    img, txt = _check(img, txt)
    scale = _scale(log_scale, max_scale)
    img_all_BxD, txt_all_BxD = gather(img), gather(txt)
    chex.assert_rank([img_all_BxD, txt_all_BxD], 2)
    pos_b = scale * jnp.sum(img * txt, axis=-1)
    logits_i2t_bxB = scale * img @ txt_all_BxD.T
    logits_t2i_bxB = scale * txt @ img_all_BxD.T
    if txt_neg is not None:
        sim, valid = _hard_negatives(img, txt_neg, neg_valid, neg_scope, gather)
        logits_i2t_bxB = jnp.concatenate([logits_i2t_bxB, jnp.where(valid, scale * sim, _NEG)], axis=-1)
    ce_i2t_b = jax.nn.logsumexp(logits_i2t_bxB, axis=-1) - pos_b
    ce_t2i_b = jax.nn.logsumexp(logits_t2i_bxB, axis=-1) - pos_b
    loss = 0.5 * (jnp.mean(ce_i2t_b) + jnp.mean(ce_t2i_b))
    # Compare against a recomputed positive so ties with itself count as correct.
    acc_i2t = jnp.mean(jnp.max(logits_i2t_bxB, axis=-1) <= pos_b + 1e-6 * scale)
    acc_t2i = jnp.mean(jnp.max(logits_t2i_bxB, axis=-1) <= pos_b + 1e-6 * scale)
    metrics = dict(loss=loss, logit_scale=scale, i2t_acc=acc_i2t, t2i_acc=acc_t2i)
    return loss, metrics


def sigmoid_loss(
    img, txt, log_scale, bias, *, txt_neg=None, neg_valid=None, neg_scope="batch", gather=identity, max_scale=None
):
    """SigLIP pairwise sigmoid loss.

    loss = mean_i sum_j -log sigmoid(z_ij (t <x_i, y_j> + b)), z = +1 if j == i
    else -1, over local image rows i and all B gathered texts j.

    Args:
      img: [b, D] L2-normalised image embeddings (local rows).
      txt: [b, D] L2-normalised text embeddings; row i pairs with img row i.
      log_scale: scalar t'; t = exp(t'), t' used as it is (projected by the family;
        `max_scale` clips the forward value only).
      bias: scalar b.
      txt_neg: optional [b, K, D] hard-negative captions; each valid one adds a
        z = -1 term to the row of every image (neg_scope='batch': all B*K captions
        of the global batch) or of its own image ('own').
      neg_valid: optional [b, K] bool; False captions add nothing.
      gather: local [b, D] -> global [B, D] (see the module docstring).
    Returns:
      (loss, metrics): metrics: loss, logit_scale, logit_bias, i2t_acc, t2i_acc
      (t2i_acc over local texts vs gathered images).
    """
    img, txt = _check(img, txt)
    t = _scale(log_scale, max_scale)
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
        sim, valid = _hard_negatives(img, txt_neg, neg_valid, neg_scope, gather)
        hard = t * sim + bias
        per_row_b = per_row_b + jnp.sum(jnp.where(valid, -jax.nn.log_sigmoid(-hard), 0.0), axis=-1)
    loss = jnp.mean(per_row_b)
    acc_i2t = jnp.mean(jnp.max(logits_bxB, axis=-1) <= pos_b + 1e-6 * t)
    img_all_BxD = gather(img)
    logits_t2i_bxB = t * txt @ img_all_BxD.T + bias
    acc_t2i = jnp.mean(jnp.max(logits_t2i_bxB, axis=-1) <= pos_b + 1e-6 * t)
    metrics = dict(loss=loss, logit_scale=t, logit_bias=bias, i2t_acc=acc_i2t, t2i_acc=acc_t2i)
    return loss, metrics


def itc_max_loss(img_bxQxD, txt_bxD, temp, *, label_smoothing: float = 0.0, gather=identity):
    """BLIP-2's ITC: an image is Q query embeddings, a text one; their similarity is
    the highest of the Q dot products, s(i, t) = max_q <img[i, q], txt[t]>.

    Args:
      img_bxQxD: [b, Q, D] L2-normalised query embeddings (local rows).
      txt_bxD: [b, D] L2-normalised text embeddings ([CLS]); row i pairs with image i.
      temp: scalar temperature (logits = s / temp).
      label_smoothing: s of the cross entropy (BLIP-2: 0.1): the target is
        (1 - s) one-hot + s / B over the B global candidates.
      gather: local -> global rows (module docstring).
    Returns (loss, metrics): loss = mean over local rows of (CE_i2t + CE_t2i) / 2
    against the B gathered candidates; metrics loss, temp, i2t_acc, t2i_acc.
    """
    chex.assert_rank([img_bxQxD, txt_bxD], [3, 2])
    img, txt = img_bxQxD.astype(jnp.float32), txt_bxD.astype(jnp.float32)
    img_all_BxQxD, txt_all_BxD = gather(img), gather(txt)
    inv = 1.0 / temp
    pos_b = inv * jnp.max(jnp.einsum("bqd,bd->bq", img, txt), axis=-1)
    logits_i2t_bxB = inv * jnp.max(jnp.einsum("bqd,Bd->bBq", img, txt_all_BxD), axis=-1)
    logits_t2i_bxB = inv * jnp.max(jnp.einsum("bd,Bqd->bBq", txt, img_all_BxQxD), axis=-1)
    s = jnp.asarray(label_smoothing, jnp.float32)

    def ce(logits_bxB):
        lse_b = jax.nn.logsumexp(logits_bxB, axis=-1)
        return (1.0 - s) * (lse_b - pos_b) + s * (lse_b - jnp.mean(logits_bxB, axis=-1))

    loss = 0.5 * (jnp.mean(ce(logits_i2t_bxB)) + jnp.mean(ce(logits_t2i_bxB)))
    tol = 1e-6 * inv
    acc_i2t = jnp.mean(jnp.max(logits_i2t_bxB, axis=-1) <= pos_b + tol)
    acc_t2i = jnp.mean(jnp.max(logits_t2i_bxB, axis=-1) <= pos_b + tol)
    return loss, dict(loss=loss, temp=jnp.asarray(temp, jnp.float32), i2t_acc=acc_i2t, t2i_acc=acc_t2i)
