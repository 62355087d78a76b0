"""mmjax: multimodal pretraining in JAX/Flax.

    import mmjax

    m = mmjax.load("workdirs/demo", weights="ema")   # a trained (or converted) workdir
    m.encode_image(images), m.encode_text(texts), m.zero_shot(images, class_names)

`import mmjax` imports nothing heavy (no jax, no TensorFlow): `load` and `Model`
come from `mmjax.api` on first use. See docs/usage.md ("Python API").
"""

__version__ = "0.1.0"

_API = ("load", "Model")
__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        from mmjax import api

        return getattr(api, name)
    raise AttributeError(f"module 'mmjax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
