"""Captioning language-model loss (CoCa, BLIP): next-token cross entropy."""

import chex
import jax
import jax.numpy as jnp

from mmjax.models.tokens import MMJAX
from mmjax.parallel.collective import global_mean, identity


def lm_loss(
    logits_BxLxV,
    ids_BxL,
    *,
    label_smoothing: float = 0.0,
    pad_id: int = MMJAX["pad"],
    gather=identity,
    target_mask_BxL=None,
):
    """Position i predicts token i + 1: mean over every non-pad target token of the
    batch of the cross entropy against (1 - s) one-hot + s / V (label smoothing s).

    logits [B, L, V] from a causal decoder fed ids [B, L] (bos first); the last
    position predicts nothing; `pad_id` (the tokenizer's) marks no target, or, when
    given, `target_mask_BxL` (True at the tokens to predict: a conversation's
    assistant answers) says which tokens are targets. Under pmap
    the token count is global.
    -> (loss, metrics): loss_lm, lm_acc (top-1 over target tokens).
    """
    chex.assert_rank([logits_BxLxV, ids_BxL], [3, 2])
    chex.assert_equal(logits_BxLxV.shape[:2], ids_BxL.shape)
    logp = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
    targets = ids_BxL[:, 1:].astype(jnp.int32)
    if target_mask_BxL is None:
        weight = (targets != pad_id).astype(jnp.float32)
    else:
        chex.assert_equal_shape([target_mask_BxL, ids_BxL])
        weight = target_mask_BxL[:, 1:].astype(jnp.float32)
    nll = -jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[:, :, 0]
    s = jnp.asarray(label_smoothing, jnp.float32)
    per_token = (1.0 - s) * nll + s * (-jnp.mean(logp, axis=-1))
    count = jnp.sum(weight)
    loss = global_mean(gather, jnp.sum(weight * per_token), count)
    hit = (jnp.argmax(logp, axis=-1) == targets).astype(jnp.float32)
    return loss, {"loss_lm": loss, "lm_acc": global_mean(gather, jnp.sum(weight * hit), count)}
