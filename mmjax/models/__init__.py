"""Flax linen modules: embed -> attention/blocks -> encoders -> zoo."""

from mmjax.models.attention import MultiHeadAttention, causal_mask, combine_masks, padding_mask
from mmjax.models.embed import PatchEmbed, WordEmbed
from mmjax.models.fusion import BertTextEncoder, FusionBlock, ItmHead, MlmHead
from mmjax.models.multiway import MultiwayAttention, MultiwayBlock, MultiwayEncoder
from mmjax.models.text import TextEncoder
from mmjax.models.transformer import Block, Encoder, Mlp
from mmjax.models.variants import parse_variant
from mmjax.models.vit import ViT

__all__ = [
    "BertTextEncoder",
    "Block",
    "Encoder",
    "FusionBlock",
    "ItmHead",
    "Mlp",
    "MlmHead",
    "MultiHeadAttention",
    "MultiwayAttention",
    "MultiwayBlock",
    "MultiwayEncoder",
    "PatchEmbed",
    "TextEncoder",
    "ViT",
    "WordEmbed",
    "causal_mask",
    "combine_masks",
    "padding_mask",
    "parse_variant",
]
