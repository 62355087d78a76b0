"""What the families share: param init (with logical axis names), and for the fusion
families (ALBEF, VLMo, BEiT-3) applying one method of their linen module and the
evaluator's view of them."""
import flax.linen as nn
import jax.numpy as jnp


class Family:
  """`init_params` from dummy inputs of the family's image size and text length."""
  model = None
  image_size = 224
  text_len = 77

  def init_params(self, rng, image_shape=None, text_shape=None, *, boxed=False):
    """Params from dummy zeros; shapes are static tuples (eval_shape-friendly).

    image_shape: (B, H, W, 3), default (1, image_size, image_size, 3);
    text_shape: (B, L), default (1, text_len). `boxed=True` keeps each param in its
    `nn.LogicallyPartitioned` box (its logical axis names, for sharding); the
    default returns plain arrays.
    """
    image = jnp.zeros(tuple(image_shape or (1, self.image_size, self.image_size, 3)), jnp.float32)
    text = jnp.zeros(tuple(text_shape or (1, self.text_len)), jnp.int32)
    params = self.model.init(rng, image, text)["params"]
    return params if boxed else nn.unbox(params)


class FeatureFamily(Family):
  """Base of families whose `.model` has `image_features(image) -> (emb, tokens)` and
  `text_features(ids) -> (emb, tokens)`; the subclass adds `itm_scores`.

  The evaluator ranks by the L2-normalised embeddings (`encode_image`/`encode_text`)
  and re-ranks with ITM on the tokens (`image_features`/`text_features`).
  """
  model = None

  def _apply(self, params, method, *args):
    return self.model.apply({"params": params}, *args, method=method)

  def encode_image(self, params, image):
    """[B, H, W, 3] -> [B, E] float32, L2-normalised."""
    return self._apply(params, self.model.image_features, image)[0]

  def encode_text(self, params, text):
    """[B, L] int32 -> [B, E] float32, L2-normalised."""
    return self._apply(params, self.model.text_features, text)[0]

  def image_features(self, params, image):
    """-> (emb [B, E], image tokens the family's ITM consumes)."""
    return self._apply(params, self.model.image_features, image)

  def text_features(self, params, text):
    """-> (emb [B, E], text tokens the family's ITM consumes)."""
    return self._apply(params, self.model.text_features, text)


def attention_spec(model_config) -> str:
  """model.attention (default 'xla'), validated: 'xla' | 'cudnn', optionally '/N'."""
  from mmjax.models.attention import parse_attention

  spec = str(model_config.get("attention", None) or "xla")
  parse_attention(spec)
  return spec
