"""Pure loss functions over embeddings of the global batch."""

from mmjax.objectives.contrastive import identity, itc_loss, itc_max_loss, sigmoid_loss
from mmjax.objectives.distill import alpha_at, ema_update, itc_distill_loss, momentum_at
from mmjax.objectives.itm import itm_loss, same_rows, sample_hard_negatives
from mmjax.objectives.lm import lm_loss
from mmjax.objectives.mdm import blockwise_mask, mdm_loss, patch_targets
from mmjax.objectives.mlm import mask_tokens, mlm_loss
from mmjax.objectives.queues import enqueue, init_queues, queue_valid

__all__ = [
    "identity",
    "itc_loss",
    "itc_max_loss",
    "sigmoid_loss",
    "alpha_at",
    "ema_update",
    "itc_distill_loss",
    "momentum_at",
    "itm_loss",
    "same_rows",
    "sample_hard_negatives",
    "lm_loss",
    "blockwise_mask",
    "mdm_loss",
    "patch_targets",
    "mask_tokens",
    "mlm_loss",
    "enqueue",
    "init_queues",
    "queue_valid",
]
