"""Checkpoints in and out of mmjax.

`formats`: `mmjax export` to safetensors and StableHLO; `serving`: runs the StableHLO
encoders; `hf`: transformers CLIP directories <-> mmjax CLIP params and workdirs
(`load_clip`, `save_clip`, `convert_to_workdir`, `export_workdir`).
Nothing is imported here; submodules import their optional dependencies lazily.
"""
