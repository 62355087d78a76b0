"""Masked language modelling: BERT token masking and the (distilled) MLM loss.

Shape letters: B batch, L sequence length, V vocabulary size.
The special ids come from the tokenizer (`mmjax.models.tokens.TokenIds.mlm`); the
defaults are those of mmjax's tokenizer (pad 0, unk 1, bos 2, eos 3, mask 4, cls 5).
"""

import chex
import jax
import jax.numpy as jnp

from mmjax.models.tokens import TokenIds
from mmjax.parallel.collective import global_mean, identity

_MMJAX = TokenIds()


def mask_tokens(
    rng, ids_BxL, *, vocab_size, mask_id, special_ids=_MMJAX.special, prob=0.15, first_random_id=_MMJAX.first_word
):
    """BERT masking.

    Each token whose id is not in `special_ids` is selected independently with
    probability `prob` (0.15 in BERT, 0.5 for BEiT-3's text in pairs). A selected
    token becomes `mask_id` with probability 0.8, a random id drawn uniformly
    from [first_random_id, vocab_size) with probability 0.1, and stays unchanged
    with probability 0.1. Special tokens are never selected.

    Args:
      rng: PRNG key.
      ids_BxL: [B, L] int token ids.
    Returns:
      (masked_ids_BxL, target_mask_BxL): the corrupted ids (dtype of ids_BxL) and
      the bool selection mask; the targets are the original `ids_BxL`.
    """
    chex.assert_rank(ids_BxL, 2)
    if not first_random_id < vocab_size:
        raise ValueError(f"first_random_id {first_random_id} must be < vocab_size {vocab_size}")
    k_sel, k_how, k_tok = jax.random.split(rng, 3)
    shape = ids_BxL.shape
    special_K = jnp.asarray(special_ids, ids_BxL.dtype).reshape(-1)
    is_special_BxL = jnp.any(ids_BxL[:, :, None] == special_K[None, None, :], axis=-1)
    selected_BxL = (jax.random.uniform(k_sel, shape) < prob) & ~is_special_BxL
    how_BxL = jax.random.uniform(k_how, shape)
    random_BxL = jax.random.randint(k_tok, shape, first_random_id, vocab_size).astype(ids_BxL.dtype)
    out_BxL = jnp.where(selected_BxL & (how_BxL < 0.8), jnp.asarray(mask_id, ids_BxL.dtype), ids_BxL)
    out_BxL = jnp.where(selected_BxL & (how_BxL >= 0.8) & (how_BxL < 0.9), random_BxL, out_BxL)
    return out_BxL, selected_BxL


def mlm_loss(logits_BxLxV, targets_BxL, target_mask_BxL, *, teacher_logits_BxLxV=None, alpha=0.0, gather=identity):
    """Cross entropy on the masked positions, optionally distilled (ALBEF).

    ce = mean over masked tokens of the batch of -log softmax(logits)[target].
    With teacher logits: loss = (1 - alpha) * ce + alpha * soft, where soft is
    the mean over masked tokens of -sum_v softmax(teacher)_v log softmax(logits)_v
    and the teacher is under stop_gradient. All logits are taken in float32.
    With no masked token the loss is 0 (finite, zero gradient).

    Args:
      logits_BxLxV: [B, L, V] student logits.
      targets_BxL: [B, L] int original token ids.
      target_mask_BxL: [B, L] bool, True where the token was selected.
      teacher_logits_BxLxV: optional [B, L, V] momentum-model logits.
      alpha: distillation weight (ignored without teacher logits).
      gather: a Collective; under pmap the token count is global, so the mean over
        devices of the returned loss is the mean over every masked token.
    Returns:
      (loss, metrics): metrics: loss_mlm, mlm_acc (over masked tokens).
    """
    chex.assert_rank([logits_BxLxV, targets_BxL, target_mask_BxL], [3, 2, 2])
    chex.assert_equal_shape([targets_BxL, target_mask_BxL])
    chex.assert_equal(logits_BxLxV.shape[:2], targets_BxL.shape)
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    targets_BxL = targets_BxL.astype(jnp.int32)
    nll_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[:, :, None], axis=-1)[:, :, 0]
    m_BxL = target_mask_BxL.astype(jnp.float32)
    count = jnp.sum(m_BxL)
    loss = global_mean(gather, jnp.sum(m_BxL * nll_BxL), count)
    if teacher_logits_BxLxV is not None:
        chex.assert_equal_shape([teacher_logits_BxLxV, logits_BxLxV])
        t_prob_BxLxV = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits_BxLxV).astype(jnp.float32), axis=-1)
        soft_BxL = -jnp.sum(t_prob_BxLxV * logp_BxLxV, axis=-1)
        alpha = jnp.asarray(alpha, jnp.float32)
        loss = (1 - alpha) * loss + alpha * global_mean(gather, jnp.sum(m_BxL * soft_BxL), count)
    hit_BxL = (jnp.argmax(logp_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
    metrics = dict(loss_mlm=loss, mlm_acc=global_mean(gather, jnp.sum(m_BxL * hit_BxL), count))
    return loss, metrics
