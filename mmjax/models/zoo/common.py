"""What the fusion families (ALBEF, VLMo, BEiT-3) share: applying one method of
their linen module, and the evaluator's view of them."""


class FeatureFamily:
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
