"""mmjax data layer: TFDS builders (shapes, emoji), file lists, tokenizer, tf.data pipeline.

TensorFlow is imported lazily, inside functions of `pipeline` (and by the builder
modules `shapes` / `emoji_ds`, which `pipeline` imports lazily).
"""
