"""Checkpoints in and out of mmjax.

`formats`: `mmjax export` to safetensors and StableHLO (`stablehlo`); `serving`: runs
the StableHLO encoders; `hf`: transformers CLIP directories <-> mmjax CLIP params
(`load_clip`, `save_clip`; `hf_config`: the config side); `hf_workdir`: <-> workdirs
(`convert_to_workdir`, `export_workdir`; `hf_card`: the model card). Workdirs are read
through `mmjax.workdir`.
Nothing is imported here; submodules import their optional dependencies lazily.
"""
