"""Image-text matching (ALBEF / BLIP): hard-negative sampling and the 2-way loss.

Shape letters: b local batch (rows this call owns), B global batch, N rows
fed to the ITM head (typically b positives + b negatives per direction).
"""

import chex
import jax
import jax.numpy as jnp

from mmjax.parallel.collective import global_mean, identity, local


def same_rows(text_bxL, text_BxL):
    """[b, B] bool: True where global row j's token ids equal local row i's, token for
    token (padding included). For ITM negatives: a candidate text identical to the
    anchor image's caption, or a candidate image whose caption is the anchor text, is
    the positive under another id and must not be drawn as a negative."""
    chex.assert_rank([text_bxL, text_BxL], 2)
    chex.assert_equal(text_bxL.shape[1], text_BxL.shape[1])
    return jnp.all(text_bxL[:, None, :] == text_BxL[None, :, :], axis=-1)


def sample_hard_negatives(rng, sim_bxB, ids_b, ids_B, valid_B=None, *, gather=identity, exclude_bxB=None):
    """Samples one hard negative column of the global batch for each local row.

    Column j is drawn with probability proportional to softmax(sim_bxB[i])_j
    restricted to the allowed columns, i.e. exp(sim_ij) / sum over allowed j'.
    Allowed = a different id than row i (this excludes the row's own positive
    and every other pair with the same id, so no device index is needed) and
    valid_B[j] and not exclude_bxB[i, j] (e.g. `same_rows` of the captions: the
    anchor's own caption under another id). BLIP uses the same weights (softmax of the similarity with
    positives zeroed). Sampling is Gumbel-max in float32, after subtracting the
    row's largest allowed logit, so bf16 inputs and huge logits stay finite.

    The Gumbel noise is drawn for the whole [B, B] global batch from `rng` and
    `gather.local` keeps this call's rows, so a pmapped step (b = B / devices) and
    a jitted one (b = B) draw the same negatives from the same replicated key.

    Args:
      rng: PRNG key.
      sim_bxB: [b, B] already-scaled logits (e.g. cosine / temp) of the local
        rows against the global batch; any float dtype.
      ids_b: [b] int ids of the local rows.
      ids_B: [B] int ids of the global columns (gathered `ids_b`).
      valid_B: optional [B] bool; False columns are never drawn.
      exclude_bxB: optional [b, B] bool; True entries are never drawn for that row.
      gather: a `mmjax.parallel.collective.Collective` (identity under jit).
    Returns:
      (idx_b, has_neg_b): idx_b [b] int32 column indices in [0, B); has_neg_b [b]
      bool, False where no allowed column exists (e.g. batch size 1, or every other
      row shares the anchor's caption). There
      idx_b is 0, an in-range but meaningless index: give those rows weight 0 in
      `itm_loss`.
    """
    chex.assert_rank([sim_bxB, ids_b, ids_B], [2, 1, 1])
    b, B = sim_bxB.shape
    chex.assert_equal(ids_b.shape[0], b)
    chex.assert_equal(ids_B.shape[0], B)
    allowed_bxB = ids_b[:, None] != ids_B[None, :]
    if valid_B is not None:
        chex.assert_equal_shape([valid_B, ids_B])
        allowed_bxB = allowed_bxB & valid_B.astype(bool)[None, :]
    if exclude_bxB is not None:
        chex.assert_equal_shape([exclude_bxB, sim_bxB])
        allowed_bxB = allowed_bxB & ~exclude_bxB.astype(bool)
    has_neg_b = jnp.any(allowed_bxB, axis=-1)
    big = jnp.finfo(jnp.float32).max / 4
    sim_bxB = jnp.clip(jax.lax.stop_gradient(sim_bxB).astype(jnp.float32), -big, big)
    row_max_b = jnp.max(jnp.where(allowed_bxB, sim_bxB, -big), axis=-1)
    z_bxB = sim_bxB - row_max_b[:, None]  # <= 0 on allowed columns
    rows = b * getattr(gather, "shards", 1)  # the global batch's rows; this call keeps its own
    g_bxB = local(gather, jax.random.gumbel(rng, (rows, B), jnp.float32))
    score_bxB = jnp.where(allowed_bxB, z_bxB + g_bxB, -jnp.inf)
    idx_b = jnp.argmax(score_bxB, axis=-1).astype(jnp.int32)
    idx_b = jnp.where(has_neg_b, idx_b, 0)
    return idx_b, has_neg_b


def itm_loss(logits_Nx2, labels_N, weights_N=None, *, gather=identity):
    """2-way image-text matching cross entropy (label 1 = matched, 0 = not).

    Args:
      logits_Nx2: [N, 2] ITM head logits (computed in float32).
      labels_N: [N] int labels in {0, 1}.
      weights_N: optional [N] non-negative weights; 0 drops a row (e.g. a
        negative that does not exist, `has_neg_b` False). None = all 1.
      gather: a Collective; under pmap sum(w) is taken over all devices, so the
        mean over devices of the returned loss is the global weighted mean.
    Returns:
      (loss, metrics): loss = sum(w * ce) / sum(w) (0 if all weights are 0);
      metrics: loss_itm, itm_acc (weighted the same way).
    """
    chex.assert_rank([logits_Nx2, labels_N], [2, 1])
    chex.assert_equal(logits_Nx2.shape[-1], 2)
    chex.assert_equal(labels_N.shape[0], logits_Nx2.shape[0])
    logp_Nx2 = jax.nn.log_softmax(logits_Nx2.astype(jnp.float32), axis=-1)
    labels_N = labels_N.astype(jnp.int32)
    ce_N = -jnp.take_along_axis(logp_Nx2, labels_N[:, None], axis=-1)[:, 0]
    if weights_N is None:
        weights_N = jnp.ones(labels_N.shape, jnp.float32)
    chex.assert_equal_shape([weights_N, labels_N])
    w_N = weights_N.astype(jnp.float32)
    w_sum = jnp.sum(w_N)
    loss = global_mean(gather, jnp.sum(w_N * ce_N), w_sum)
    hit_N = (jnp.argmax(logp_Nx2, axis=-1) == labels_N).astype(jnp.float32)
    metrics = dict(loss_itm=loss, itm_acc=global_mean(gather, jnp.sum(w_N * hit_N), w_sum))
    return loss, metrics
