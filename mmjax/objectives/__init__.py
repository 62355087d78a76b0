"""Pure loss functions over embeddings of the global batch."""
from mmjax.objectives.contrastive import identity, itc_loss, sigmoid_loss

__all__ = ["identity", "itc_loss", "sigmoid_loss"]
