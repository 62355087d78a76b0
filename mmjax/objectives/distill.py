"""Momentum distillation (ALBEF / BLIP): EMA teacher, schedules, ITC with queues.

Shape letters: b local batch (rows this call owns), B global batch, S queue
size, C = B + S candidates, D embed dim.

Gather semantics follow `mmjax.objectives.contrastive`: `gather` maps a local
array to the global one along axis 0 (identity under `jax.jit` on a mesh;
`lambda x: jax.lax.all_gather(x, 'data', tiled=True)` under pmap/shard_map).
Here it is applied to [b, D] teacher features and to the [b] ids and valid
mask as well, so positives are found by id and no device index is needed.
Each device scores its own rows against all gathered candidates; the per-device
losses are normalised so that their mean over devices (`lax.pmean`) equals the
global loss exactly, also when a `valid_b` mask leaves devices with different
numbers of real rows. Candidates are teacher features (stop_gradient), so no
gradient flows through `gather`: each device's gradient w.r.t. its own rows is
(N devices) x its share of the global gradient, and `lax.pmean` of per-device
gradients equals the global gradient (as for `itc_loss`).
"""

import math

import chex
import jax
import jax.numpy as jnp

from mmjax.objectives.contrastive import identity
from mmjax.objectives.queues import queue_valid

# Logit for excluded candidates: finite, so softmax gives exactly 0 there and
# 0 * log_softmax stays finite (no inf - inf / 0 * inf NaNs).
_NEG = -1e9


def ema_update(ema_params, params, momentum):
    """Leafwise momentum * ema + (1 - momentum) * params, in each ema leaf's dtype.

    The sum is computed in float32 (or wider, for float64 leaves) and cast back, so
    the teacher's precision is its own dtype: keep it float32 (the families'
    `init_extra` does, whatever model.param_dtype). A bf16 teacher loses every
    increment below half a bf16 ulp: at momentum 0.995 a parameter near 0.03 moves
    only when the student is more than ~0.012 away, so it stops following a slowly
    drifting student. The dtype is kept (not promoted) so the state's layout never changes
    between steps. `momentum` may be a traced scalar (see `momentum_at`).
    """
    m = jnp.asarray(momentum, jnp.float32)

    def upd(e, p):
        dt = jnp.promote_types(e.dtype, jnp.float32)
        new = m.astype(dt) * e.astype(dt) + (1 - m).astype(dt) * p.astype(dt)
        return new.astype(e.dtype)

    return jax.tree.map(upd, ema_params, params)


def momentum_at(step, base=0.995, final=None, total_steps=None):
    """EMA momentum at `step`: constant `base`, or a cosine ramp to `final`.

    With `final` (BYOL): m = final - (final - base) * (cos(pi * k / K) + 1) / 2,
    k = min(step, K), K = total_steps; m(0) = base, m(K..) = final.
    Returns a float32 jnp scalar.
    """
    if final is None:
        return jnp.asarray(base, jnp.float32)
    if total_steps is None or total_steps <= 0:
        raise ValueError("momentum_at: a cosine ramp to `final` needs total_steps > 0")
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
    return jnp.asarray(final - (final - base) * (jnp.cos(math.pi * frac) + 1) / 2, jnp.float32)


def alpha_at(step, alpha=0.4, ramp_steps=0):
    """Distillation weight: alpha * min(1, step / ramp_steps); alpha if ramp_steps == 0.

    ALBEF ramps alpha linearly from 0 over the first epoch. Float32 jnp scalar.
    """
    if ramp_steps == 0:
        return jnp.asarray(alpha, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / ramp_steps, 0.0, 1.0)
    return jnp.asarray(alpha * frac, jnp.float32)


def itc_distill_loss(
    img_bxD, txt_bxD, ids_b, t_img_bxD, t_txt_bxD, queues, temp, alpha, *, gather=identity, valid_b=None
):
    """ALBEF image-text contrastive loss with momentum distillation and queues.

    For a local image row i the C = B + S candidates are the global batch's
    teacher text features `gather(t_txt)` followed by the queue's text features
    (symmetrically, a text row is scored against `gather(t_img)` + image queue):

      student logits s_ic = <img_i, cand_c> / temp
      teacher logits t_ic = <t_img_i, cand_c> / temp
      target_ic = alpha * softmax(t_i)_c + (1 - alpha) * pos_ic / sum_c pos_ic
      ce_i = -sum_c target_ic * log_softmax(s_i)_c

    pos_ic = [id of candidate c == id of row i] (BLIP: same-id entries, the
    row's own pair included, are never negatives). Excluded from both softmaxes
    and from the positives: empty queue slots (id -1) and, with `valid_b`,
    padded rows of the batch. The loss is (ce_i2t + ce_t2i) / 2 averaged over the
    valid rows of the global batch (see the module docstring for pmap).

    Args:
      img_bxD, txt_bxD: [b, D] L2-normalised student embeddings (local rows).
      ids_b: [b] int ids (>= 0) of the local pairs; equal ids are positives.
      t_img_bxD, t_txt_bxD: [b, D] L2-normalised teacher (EMA) embeddings of the
        same rows. Under stop_gradient, as are the queues and the targets.
      queues: dict from `init_queues` (features of previous batches, as written
        by `enqueue`; not updated here).
      temp: positive scalar temperature, clamped by the caller (e.g. to
        [0.001, 0.5]); gradients flow to it.
      alpha: distillation weight in [0, 1] (see `alpha_at`); 0 = hard targets.
      gather: local -> global along axis 0, applied to [b, D] and [b] arrays.
      valid_b: optional [b] bool; False rows are dropped from the loss mean and
        from the candidates.
    Returns:
      (loss, metrics): metrics: loss_itc, temp, i2t_acc, t2i_acc (the argmax of
      the student logits is a positive), averaged like the loss.
    """
    chex.assert_rank([img_bxD, txt_bxD, t_img_bxD, t_txt_bxD, ids_b], [2, 2, 2, 2, 1])
    chex.assert_equal_shape([img_bxD, txt_bxD, t_img_bxD, t_txt_bxD])
    chex.assert_equal(ids_b.shape[0], img_bxD.shape[0])
    img_bxD, txt_bxD = img_bxD.astype(jnp.float32), txt_bxD.astype(jnp.float32)
    t_img_bxD = jax.lax.stop_gradient(t_img_bxD.astype(jnp.float32))
    t_txt_bxD = jax.lax.stop_gradient(t_txt_bxD.astype(jnp.float32))
    b = img_bxD.shape[0]
    ids_b = ids_b.astype(jnp.int32)
    if valid_b is None:
        valid_b = jnp.ones((b,), bool)
    chex.assert_equal_shape([valid_b, ids_b])
    valid_b = valid_b.astype(bool)
    temp = jnp.asarray(temp, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)

    ids_B, valid_B = gather(ids_b), gather(valid_b)
    chex.assert_rank([ids_B, valid_B], 1)
    B = ids_B.shape[0]
    cand_ids_C = jnp.concatenate([ids_B, queues["ids"].astype(jnp.int32)])
    cand_ok_C = jnp.concatenate([valid_B, queue_valid(queues)])
    pos_bxC = (ids_b[:, None] == cand_ids_C[None, :]) & cand_ok_C[None, :]
    pos_t_bxC = pos_bxC.astype(jnp.float32)
    pos_t_bxC = pos_t_bxC / jnp.maximum(jnp.sum(pos_t_bxC, axis=-1, keepdims=True), 1.0)

    txt_cand_CxD = jax.lax.stop_gradient(jnp.concatenate([gather(t_txt_bxD), queues["txt"].astype(jnp.float32)]))
    img_cand_CxD = jax.lax.stop_gradient(jnp.concatenate([gather(t_img_bxD), queues["img"].astype(jnp.float32)]))

    def one_direction(x_bxD, t_x_bxD, cand_CxD):
        s_bxC = jnp.where(cand_ok_C[None, :], x_bxD @ cand_CxD.T / temp, _NEG)
        t_bxC = jnp.where(cand_ok_C[None, :], t_x_bxD @ cand_CxD.T / temp, _NEG)
        target_bxC = jax.lax.stop_gradient(alpha * jax.nn.softmax(t_bxC, axis=-1) + (1 - alpha) * pos_t_bxC)
        ce_b = -jnp.sum(target_bxC * jax.nn.log_softmax(s_bxC, axis=-1), axis=-1)
        best_b = jnp.argmax(s_bxC, axis=-1)
        hit_b = jnp.take_along_axis(pos_bxC, best_b[:, None], axis=-1)[:, 0]
        return ce_b, hit_b

    ce_i2t_b, hit_i2t_b = one_direction(img_bxD, t_img_bxD, txt_cand_CxD)
    ce_t2i_b, hit_t2i_b = one_direction(txt_bxD, t_txt_bxD, img_cand_CxD)

    # Per-device normaliser = (global valid count) / (number of devices), so the
    # mean over devices of the local losses is the global mean over valid rows.
    n_valid = jnp.sum(valid_B.astype(jnp.float32))
    denom = jnp.maximum(n_valid, 1.0) * (b / B)
    w_b = valid_b.astype(jnp.float32)
    loss = jnp.sum(w_b * 0.5 * (ce_i2t_b + ce_t2i_b)) / denom
    metrics = dict(
        loss_itc=loss,
        temp=temp,
        i2t_acc=jnp.sum(w_b * hit_i2t_b) / denom,
        t2i_acc=jnp.sum(w_b * hit_t2i_b) / denom,
    )
    return loss, metrics
