"""A run's context built from a config and a workdir (`Setup`: tokenizer, family,
mesh, optimizer, state plan, checkpointer, stages, evaluator). A workdir's params
alone are read by `mmjax.workdir.open_workdir` (`restore_params` here calls it).
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from mmjax import checkpoint as ckpt_lib
from mmjax import config as config_lib
from mmjax import workdir as workdir_lib
from mmjax.models import zoo
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import optim
from mmjax.train import step as step_lib


class Setup:
    """Everything a run (train or eval) needs, built from a config and a workdir."""

    def __init__(self, config, workdir: str):
        from mmjax.data import chat_data, pipeline
        from mmjax.data import tokenizer as tok_lib

        self.config, self.workdir = config, workdir
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:  # a path under a regular file, a read-only parent, ...
            raise ValueError(f"workdir {workdir} cannot be created: {e.strerror or e}") from None
        data = config.data
        self.init_from = config.get("finetune", {}).get("init_from", None)
        self.init_parts = init_parts(config)
        if self.init_from:
            self._prepare_finetune()
        elif self.init_parts:
            self._prepare_parts()
        tokenizer_from = config.get("finetune", {}).get("tokenizer_from", None)
        if tokenizer_from and not self.init_from:  # finetune.init_from brings its own tokenizer
            self._take_tokenizer(os.path.abspath(os.path.expanduser(str(tokenizer_from))))
        get_tokenizer = lambda: tok_lib.get_tokenizer(data.tokenizer, workdir, lambda: _tokenizer_texts(data))
        if jax.process_count() == 1:
            self.tokenizer = get_tokenizer()
        else:
            # Process 0 builds the built-in data and trains the tokenizer (shared
            # workdir); the others wait for it instead of racing to write the same files.
            from jax.experimental import multihost_utils

            if jax.process_index() == 0:
                self.tokenizer = get_tokenizer()
                # building a built-in set prepares all its splits; the eval split is not
                # touched here (a shards directory may hold none: eval is then off or
                # data.eval_path), as on one process
                pipeline.num_examples(data, data.train_split)
            multihost_utils.sync_global_devices("mmjax: data and tokenizer ready")
            if jax.process_index() != 0:
                self.tokenizer = get_tokenizer()
        # vocab_size, token_ids, image_size, num_frames, text_len, total_steps: from the
        # tokenizer and data.* / train.*; a config value that contradicts them is a ConfigError.
        config_lib.derive_model_keys(config, self.tokenizer.vocab_size, self.tokenizer.special_ids)
        self.family = zoo.build(config.model)
        chat_data.derive_image_tokens(data, self.family.image_tokens)
        self.mode = config.parallel.get("mode", "mesh")
        # pmap keeps a replica of the state per device; its checkpoints use the
        # replicated layout of a 1-D data mesh, so either mode can restore them.
        self.mesh = mesh_lib.make_mesh(config.parallel.get("mesh") if self.mode == "mesh" else None)
        self.schedule = optim.learning_rate_schedule(config.train)
        self.optimizer = optim.make_optimizer(config.train)
        self.image_shape = self.family.image_shape()
        self.text_shape = (1, data.text_len)
        self._init, self.abstract_state, self.state_sharding = step_lib.state_plan(
            self.family, self.optimizer, self.mesh, self.image_shape, self.text_shape
        )
        if self.mode == "pmap":
            self.state_sharding = jax.tree_util.tree_map(lambda _: mesh_lib.replicated(self.mesh), self.abstract_state)
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=int(config.train.keep_checkpoints),
            async_save=bool(config.train.get("async_checkpoints", True)),
        )

    def stages(self) -> list[dict]:
        """The training stages: [{name, until, tasks, freeze, family, trainable}].

        Without `train.stages` there is one stage over all steps with `train.freeze`.
        A stage may name `tasks` (the family's objectives in that stage, e.g. VLMo's
        image-only, then text-only, then image-text pretraining) and `freeze` (regexes
        of params kept fixed); stages end at their `until` step (an int) or at that
        fraction of train.steps (a float in (0, 1]).
        """
        tc = self.config.train
        specs = tc.get("stages", None) or [dict(name="all", until=int(tc.steps))]
        out, prev = [], 0
        for i, spec in enumerate(specs):
            spec = dict(spec)
            unknown = set(spec) - {"name", "until", "tasks", "freeze"}
            if unknown:
                raise ValueError(
                    f"train.stages[{i}] has unknown keys {sorted(unknown)}; valid keys: name, until, tasks, freeze"
                )
            until = spec.get("until", tc.steps)
            # A float in (0, 1] is a fraction of train.steps, so a recipe's stages
            # follow --config.train.steps; an int is an absolute step.
            until = int(round(until * int(tc.steps))) if isinstance(until, float) and until <= 1 else int(until)
            if until <= prev:
                raise ValueError(f"train.stages[{i}].until={until} must exceed the previous stage's end {prev}")
            prev = until
            family = self.family
            tasks = spec.get("tasks")
            if tasks is not None:
                model_cfg = ml_collections.ConfigDict(self.config.model.to_dict())
                model_cfg.tasks = tuple(tasks)
                family = zoo.build(model_cfg)
            freeze = tuple(spec.get("freeze", None) or tc.get("freeze", None) or ())
            trainable = optim.trainable_mask(self.abstract_state.params, freeze)
            out.append(
                dict(
                    name=spec.get("name", f"stage{i}"),
                    until=until,
                    family=family,
                    tasks=tuple(getattr(family, "tasks", ()) or ()),
                    freeze=freeze,
                    trainable=trainable,
                )
            )
        return out

    def _prepare_finetune(self):
        """Before anything is built: the source's tokenizer (the text tower must read the
        same ids) and, for a classifier or VQA model, the source's model as backbone."""
        from mmjax.train import finetune

        src_workdir, _ = finetune.source(self.init_from)
        src_config = workdir_lib.load_config_json(src_workdir)
        if not self.config.data.tokenizer.get("path"):
            _copy_tokenizer(os.path.join(src_workdir, "tokenizer.model"), os.path.join(self.workdir, "tokenizer.model"))
        model = self.config.model
        if model.get("family") in zoo.WRAPPERS:  # the backbone is what the checkpoint holds
            with self.config.unlocked():
                model.backbone = src_config.model.to_dict()

    def fresh_state(self):
        """The initial state, created sharded (pmap layout in pmap mode); with
        `finetune.init_from`, the params come from that checkpoint (`train.finetune`)."""
        init = jax.jit(self._init, out_shardings=self.state_sharding)
        state = init(jax.random.PRNGKey(int(self.config.seed)))
        if self.init_from or self.init_parts:
            state = self._load_pretrained(state)
        return self.to_run_layout(state)

    def _prepare_parts(self):
        """finetune.init_parts: the text comes from the part that holds the LM (`lm`),
        or from finetune.tokenizer_from (`_take_tokenizer`). Each part's architecture keys
        are checked against its source's first."""
        from mmjax.train import finetune

        finetune.check_part_configs(self.config.model, self.init_parts, workdir_lib.load_config_json)
        src = self.init_parts.get("lm")
        if src is not None and not self.config.finetune.get("tokenizer_from", None):
            self._take_tokenizer(src[0])

    def _take_tokenizer(self, src_workdir: str):
        """The run's tokenizer is that of `src_workdir` (a trained workdir's tokenizer.model
        copied here, or the data.tokenizer path and case of an imported one) unless this
        config names one."""
        if self.config.data.tokenizer.get("path"):
            return
        src_tok = workdir_lib.load_config_json(src_workdir).data.get("tokenizer", {})
        with self.config.unlocked(), self.config.ignore_type():
            if src_tok.get("path"):
                self.config.data.tokenizer.path = src_tok["path"]
                self.config.data.tokenizer.lowercase = bool(src_tok.get("lowercase", True))
                return
        _copy_tokenizer(os.path.join(src_workdir, "tokenizer.model"), os.path.join(self.workdir, "tokenizer.model"))

    def _pretrained_tree(self, params):
        """The state's params filled from finetune.init_from or finetune.init_parts."""
        from mmjax.train import finetune

        weights = self.config.finetune.get("weights", "student")
        inflation = self.config.finetune.get("inflation", None) or "central"
        if self.init_from:
            sources = [(self.init_from, None, "backbone/" if self.config.model.family in zoo.WRAPPERS else "")]
        else:
            sources = [(src, sub, part + "/") for part, (src, sub) in self.init_parts.items()]
        for src, sub, prefix in sources:
            _, pretrained = finetune.pretrained_params(src, weights)
            if sub:
                pretrained = finetune.subtree(pretrained, sub)
            params, report = finetune.transplant(params, pretrained, prefix, inflation=inflation)
            logging.info(
                "init %s from %s%s (%s): %d params loaded, %d left behind, resized %s, fresh %s",
                prefix or "all",
                src,
                f":{sub}" if sub else "",
                weights,
                report["loaded"],
                report["unused"],
                report["resized"],
                [k for k in report["kept_init"] if k.startswith(prefix)],
            )
        return self.family.finish_init(params)

    def _load_pretrained(self, state):
        params = self._pretrained_tree(jax.device_get(state.params))
        family, optimizer = self.family, self.optimizer

        def rebuild(params, rng):
            extra = family.init_extra(params)
            return state.replace(
                params=params,
                opt_state=optimizer.init(params),
                rng=rng,
                ema_params=extra.get("ema_params"),
                queues=extra.get("queues"),
            )

        return jax.jit(rebuild, out_shardings=self.state_sharding)(params, state.rng)

    def restore(self, step=None, **kw):
        """(state, meta) from the newest usable (or `step`'s) checkpoint, or None.

        The checkpoint is read straight into this run's shardings, whatever mesh,
        device count, process count or mode wrote it. Steps that fail their checksums
        or do not read are reported and passed over (`Checkpointer.restore`, whose
        keywords `require` and `quarantine` pass through); the step read is
        `self.checkpointer.restored_step`.
        """
        target = ckpt_lib.abstract_with_shardings(self.abstract_state, self.state_sharding)
        restored = self.checkpointer.restore(target, step, **kw)
        if restored is None:
            return None
        state, meta = restored
        return self.to_run_layout(state), meta

    def to_run_layout(self, state):
        """Checkpoint layout -> what the compiled step takes."""
        return mesh_lib.to_pmap(state) if self.mode == "pmap" else state

    def to_checkpoint_layout(self, state):
        """What the step returns -> checkpoint layout (global arrays on `self.mesh`)."""
        return mesh_lib.from_pmap(state, self.mesh) if self.mode == "pmap" else state

    def save(self, step: int, state, meta: dict):
        self.checkpointer.save(step, self.to_checkpoint_layout(state), meta)

    def evaluator(self, split=None):
        """The family's evaluator: held-out perplexity (a text-only LM), generated-answer
        accuracy (an LM connector), classification accuracy, or retrieval (the rest)."""
        from mmjax.eval.run import ClassificationEvaluator, Evaluator

        ev, data, fam = self.config.eval, self.config.data, self.family
        common = dict(split=split or data.eval_split, batch_size=int(ev.batch_size))
        if fam.can("lm") and not fam.can("encode"):
            from mmjax.eval.perplexity import PerplexityEvaluator

            return PerplexityEvaluator(
                fam, data, self.tokenizer, self.mesh, max_examples=ev.get("max_examples"), **common
            )
        if fam.can("generate"):
            from mmjax.eval.answers import AnswerEvaluator

            held_out = bool(ev.get("held_out_phrasings", False))
            captions = bool(ev.get("captions", False))
            return AnswerEvaluator(fam, data, self.tokenizer, self.mesh, held_out=held_out, captions=captions, **common)
        if fam.can("classify"):
            return ClassificationEvaluator(fam, data, self.mesh, tokenizer=self.tokenizer, **common)
        return Evaluator(
            fam,
            data,
            self.tokenizer,
            self.mesh,
            max_examples=ev.get("max_examples"),
            rerank_k=int(ev.get("rerank_k", 16)),
            zero_shot=ev.get("zero_shot"),
            **common,
        )


def _copy_tokenizer(src: str, dst: str) -> None:
    """The source workdir's tokenizer.model into this one (process 0; never over an existing one)."""
    if os.path.exists(src) and not os.path.exists(dst) and jax.process_index() == 0:
        import shutil

        shutil.copyfile(src, dst + ".tmp")
        os.replace(dst + ".tmp", dst)


def init_parts(config) -> dict:
    """finetune.init_parts ({part: 'WORKDIR[:SUBTREE]'}, e.g. {'vision': 'workdirs/demo:image_tower',
    'lm': 'workdirs/lm'}) -> {part: (absolute workdir or checkpoint path, subtree or None)}:
    the model's subtree `part` is filled from that workdir's params (its `SUBTREE`, or all)."""
    parts = config.get("finetune", {}).get("init_parts", None) or {}
    out = {}
    for part, spec in dict(parts).items():
        path, _, sub = str(spec).partition(":")
        out[str(part)] = (os.path.abspath(os.path.expanduser(path)), sub or None)
    if out and config.get("finetune", {}).get("init_from", None):
        raise ValueError("finetune.init_from and finetune.init_parts exclude each other: give one")
    return out


def _tokenizer_texts(data) -> list:
    """What a tokenizer is trained on: the train split's captions, and with data.chat
    the text of its conversations too (questions, answers, template pieces)."""
    from mmjax.data import chat_data, pipeline

    texts = list(pipeline.captions(data, data.train_split))
    chat = chat_data.chat_options(data)
    if chat is not None and chat["task"] != "llava":  # the built-in scenes' conversations
        texts += chat_data.tokenizer_corpus(data)
    return texts


def restore_params(workdir: str, weights: str = "student", step: int | None = None):
    """(params as host numpy, opened workdir, step): `mmjax.workdir.open_workdir`, the one
    params reader (the opened workdir has the `config`, `family` and `tokenizer`)."""
    opened = workdir_lib.open_workdir(workdir, weights=weights, step=step)
    return opened.params, opened, opened.step
