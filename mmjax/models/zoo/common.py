"""What the families share: param init (with logical axis names), and for the fusion
families (ALBEF, VLMo, BEiT-3) applying one method of their linen module and the
evaluator's view of them."""
import flax.linen as nn
import jax.numpy as jnp


class Family:
  """`init_params` from dummy inputs of the family's image size and text length (and,
  for a video model, `num_frames` frames)."""
  model = None
  image_size = 224
  text_len = 77
  num_frames = 0  # > 0: the image input is a clip [B, T, H, W, 3]

  def init_params(self, rng, image_shape=None, text_shape=None, *, boxed=False):
    """Params from dummy zeros; shapes are static tuples (eval_shape-friendly).

    image_shape: (B, H, W, 3), default (1, image_size, image_size, 3), or for a video
    model (B, T, H, W, 3), default (1, num_frames, image_size, image_size, 3);
    text_shape: (B, L), default (1, text_len). `boxed=True` keeps each param in its
    `nn.LogicallyPartitioned` box (its logical axis names, for sharding); the
    default returns plain arrays.
    """
    image = jnp.zeros(tuple(image_shape or self.image_shape()), jnp.float32)
    text = jnp.zeros(tuple(text_shape or (1, self.text_len)), jnp.int32)
    params = self.model.init(rng, image, text)["params"]
    return params if boxed else nn.unbox(params)

  def image_shape(self, batch: int = 1) -> tuple:
    """The shape of an input batch: (B, S, S, 3), or (B, T, S, S, 3) for a video model."""
    frames = (self.num_frames,) if self.num_frames else ()
    return (batch,) + frames + (self.image_size, self.image_size, 3)


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


def video_options(model_config) -> dict:
  """The video keys of a model config, validated -> ViT keyword arguments.

  model.num_frames (0 or absent: an image model; T > 0: clips of T frames, images taken
  as one-frame clips), model.temporal (video.TEMPORAL, default 'none'), model.tubelet
  (frames per token, default 1), model.temporal_kernel ('local' module, default 3).
  """
  from mmjax.models.video import check_temporal

  frames = int(model_config.get("num_frames", None) or 0)
  temporal = check_temporal(str(model_config.get("temporal", None) or "none"))
  tubelet = int(model_config.get("tubelet", None) or 1)
  kernel = int(model_config.get("temporal_kernel", None) or 3)
  if frames < 0 or tubelet < 1 or kernel < 1:
    raise ValueError(f"model.num_frames={frames}, model.tubelet={tubelet}, model.temporal_kernel={kernel}: "
                     "need num_frames >= 0 and tubelet, temporal_kernel >= 1")
  if frames and frames % tubelet:
    raise ValueError(f"model.num_frames={frames} is not a multiple of model.tubelet={tubelet}")
  if tubelet > 1 and temporal == "mean":
    raise ValueError("model.temporal='mean' encodes frames one by one: it takes model.tubelet=1")
  return dict(num_frames=frames, temporal=temporal, tubelet=tubelet, temporal_kernel=kernel)
