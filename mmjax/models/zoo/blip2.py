"""BLIP-2 stage 1: a Q-Former learns to read a frozen image encoder (MODELS.md; Li et
al. 2023; LAVIS `blip2_qformer.py`).

Shape letters: B global batch, b local rows, Q query tokens, N image tokens, Di image
width, D Q-Former width, E embed dim, L text length, V vocabulary.

- Vision (frozen by the recipe's `train.freeze`): a ViT in the CLIP image tower's layout
  (model.pool / posemb / act / ln_eps as the CLIP it comes from: any mmjax CLIP workdir's
  `image_tower`, or an imported HF CLIP's, via finetune.init_parts), its tokens read at
  `model.feature_layer` (-2: BLIP-2 drops the ViT's last block), [CLS] included, then
  `ln_vision` (a trainable LayerNorm) -> [B, N, Di].
- Q-Former (mmjax/models/qformer.py): `num_query` learned queries, cross-attention to the
  image features every `cross_every` blocks, kept in `model.qformer_dtype` (float32:
  LAVIS's INF loss in fp16) whatever the tower's dtype.
- ITC (unimodal mask): queries -> `vision_proj` -> Q normalised embeddings; text with
  <cls> at position 0 -> `text_proj` of its output there; similarity = the max over the
  Q queries (`objectives.itc_max_loss`), learned temperature clamped to temp_range,
  label smoothing 0.1 as the release.
- ITM (bidirectional mask): queries and the <cls> text attend to each other; the ITM
  head on every query output, logits averaged over the queries; hard negatives from the
  global batch drawn from the softmax of the max-over-queries similarities.
- ITG (causal mask): text from bos (BLIP-2's [DEC]) sees every query and the text before
  it, queries see queries; the tied LM head, label smoothing 0.1.
Loss = itc_weight * ITC + itm_weight * ITM + itg_weight * ITG (1 each, as released).
No momentum encoder (BLIP-2 dropped it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.flops import cross_layer, layer, vit
from mmjax.models.fusion import ItmHead, head_dense
from mmjax.models.qformer import QFormer
from mmjax.models.transformer import ACTIVATIONS, LN_EPS
from mmjax.models.variants import parse_variant
from mmjax.models.vit import image_tower
from mmjax.models.zoo.clip import l2_normalize
from mmjax.models.zoo.common import FeatureFamily, hard_negative_pairs
from mmjax.models.zoo.contract import register
from mmjax.models.zoo.llava import UnscannedOwner
from mmjax.models.zoo.schema import DTYPES, ComputeConfig, key
from mmjax.objectives import identity, itc_max_loss, itm_loss, lm_loss
from mmjax.parallel.sharding import names, norm_init

Dtype = Any
VISION_KEYS = ("image", "image_overrides", "pool", "posemb", "act", "ln_eps")


def vision_parts(owner: nn.Module):
    """In a family module's `setup`: (the ViT in the CLIP image tower's layout, unscanned,
    `ln_vision` float32). `owner.image` is the variant, `owner.vision_opts` {feature_layer,
    pool, posemb, act, ln_eps}; remat, attention and dtypes are the owner's."""
    o = dict(owner.vision_opts)
    kw = dict(pool=o["pool"], posemb=o["posemb"], act=o["act"], ln_eps=o["ln_eps"], patch_bias=False, pre_norm=True)
    tower = image_tower(owner.image, UnscannedOwner(owner), **kw)
    return tower, nn.LayerNorm(**norm_init(), dtype=jnp.float32, param_dtype=owner.param_dtype, name="ln_vision")


def qformer_part(owner: nn.Module, vocab_size: int, max_len: int) -> QFormer:
    """In a family module's `setup`: the Q-Former (params `qformer`) of `owner.qformer`'s
    variant, owner.num_query / cross_every / remat / attention, in owner.qformer_dtype."""
    q = owner.qformer
    return QFormer(
        vocab_size,
        max_len,
        q["width"],
        q["depth"],
        q["heads"],
        q["mlp_dim"],
        num_query=owner.num_query,
        cross_every=owner.cross_every,
        remat=owner.remat,
        attention=owner.attention,
        dtype=owner.qformer_dtype,
        param_dtype=owner.param_dtype,
        name="qformer",
    )


def read_vision(owner: nn.Module, image_BxHxWx3):
    """[B, S, S, 3] -> [B, N, Di]: the tower's tokens at `feature_layer` ([CLS] kept),
    through `ln_vision`, cast to the Q-Former's dtype."""
    chex.assert_rank(image_BxHxWx3, 4)
    _, aux = owner.vision(image_BxHxWx3)
    at = owner.vision_opts["feature_layer"] % owner.image["depth"]
    return owner.ln_vision(aux["encoder"][f"block{at:02d}"]).astype(owner.qformer_dtype)


class Blip2(nn.Module):
    """VisionFeatures + QFormer + projections + ITM head + temperature.

    Params: `vision` (the ViT), `ln_vision`, `qformer`, `vision_proj`, `text_proj`,
    `itm_head`, `temp`. Methods (apply with `method=`): `vision_features(image) -> [B, N, Di]`,
    `query_embeddings(feats) -> [B, Q, E]`, `text_embedding(ids) -> [B, E]` (both
    L2-normalised), `itm_logits(feats, ids) -> [B, 2]`, `lm_logits(feats, ids) -> [B, L, V]`;
    `__call__(image, ids)` runs every mode and touches every param."""

    image: Any  # the ViT variant (parse_variant)
    vision_opts: Any  # {feature_layer, pool, posemb, act, ln_eps} (vision_parts)
    qformer: Any  # the Q-Former's text variant (width, depth, heads, mlp_dim)
    embed_dim: int
    vocab_size: int
    text_len: int
    num_query: int = 32
    cross_every: int = 2
    cls_id: int = 5
    pad_id: int = 0
    remat: Any = False
    attention: str = "xla"
    dtype: Dtype = jnp.float32  # the vision tower's compute dtype
    qformer_dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.vision, self.ln_vision = vision_parts(self)
        self.qf = qformer_part(self, self.vocab_size, self.text_len)
        self.vision_proj = head_dense(self.embed_dim, name="vision_proj", param_dtype=self.param_dtype)
        self.text_proj = head_dense(self.embed_dim, name="text_proj", param_dtype=self.param_dtype)
        self.itm_head = ItmHead(param_dtype=self.param_dtype)
        self.temp = self.param("temp", names(nn.initializers.constant(0.07)), (), jnp.float32)

    def vision_features(self, image):
        return read_vision(self, image)

    def _with_cls(self, ids_BxL):
        return ids_BxL.at[:, 0].set(self.cls_id), ids_BxL != self.pad_id

    def query_embeddings(self, feats_BxNxDi):
        queries, _ = self.qf(feats_BxNxDi, None, None, "unimodal")
        return l2_normalize(self.vision_proj(queries))

    def text_embedding(self, ids_BxL):
        ids, valid = self._with_cls(ids_BxL)
        _, text = self.qf(None, ids, valid, "unimodal")
        return l2_normalize(self.text_proj(text[:, 0]))

    def itm_logits(self, feats_BxNxDi, ids_BxL):
        ids, valid = self._with_cls(ids_BxL)
        queries, _ = self.qf(feats_BxNxDi, ids, valid, "bidirectional")
        b, q, d = queries.shape
        return jnp.mean(self.itm_head(queries.reshape(b * q, d)).reshape(b, q, 2), axis=1)

    def lm_logits(self, feats_BxNxDi, ids_BxL):
        _, text = self.qf(feats_BxNxDi, ids_BxL, ids_BxL != self.pad_id, "causal")
        return self.qf.attend(text)

    def __call__(self, image, ids):
        feats = self.vision_features(image)
        return (
            self.query_embeddings(feats),
            self.text_embedding(ids),
            self.itm_logits(feats, ids),
            self.lm_logits(feats, ids),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class QFormerKeys(ComputeConfig):
    """The keys of every family with a frozen ViT read by a Q-Former: the tower (image,
    image_overrides, pool, posemb, act, ln_eps: as the CLIP it comes from),
    feature_layer, qformer / qformer_overrides (a text variant: width, depth, heads,
    mlp_dim), num_query, cross_every, qformer_dtype."""

    pool: str = key("cls", choices=("cls", "gap"))
    posemb: str = key("learn", choices=("learn", "sincos2d"))
    act: str = key("gelu_tanh", choices=tuple(ACTIVATIONS))
    ln_eps: float = key(LN_EPS)
    feature_layer: int = key(-2)
    qformer: str = key("mu")
    qformer_overrides: dict = key({})
    num_query: int = key(32)
    cross_every: int = key(2)
    qformer_dtype: str = key("float32", choices=tuple(DTYPES))
    embed_dim: int = key(256)


def vision_kw(c, image_variant) -> dict:
    """A parsed config's vision keys -> the family module's (image, vision_opts,
    qformer_dtype); ValueError for a feature_layer outside the tower."""
    if not -image_variant["depth"] <= c.feature_layer < image_variant["depth"]:
        raise ValueError(
            f"model.feature_layer={c.feature_layer} outside the vision tower's {image_variant['depth']} blocks"
        )
    opts = dict(feature_layer=c.feature_layer, pool=c.pool, posemb=c.posemb, act=c.act, ln_eps=c.ln_eps)
    return dict(image=image_variant, vision_opts=opts, qformer_dtype=DTYPES[c.qformer_dtype])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Blip2Config(QFormerKeys):
    """BLIP-2 stage 1: QFormerKeys + query_ffn_init ('text': when the Q-Former is loaded
    from a text tower, each block's query FFN starts as its text FFN, as BLIP-2 starts
    from BERT; 'fresh': its own init), temp_range (the release's clamp (0.001, 0.5)),
    label_smoothing (ITC and ITG: 0.1), itc/itm/itg weights (1 each), tasks (a subset
    of itc, itm, itg; () = all)."""

    text_len: int = key(32, derived=True)
    query_ffn_init: str = key("fresh", choices=("fresh", "text"))
    temp_range: tuple = key((0.001, 0.5))
    label_smoothing: float = key(0.1)
    itc_weight: float = key(1.0)
    itm_weight: float = key(1.0)
    itg_weight: float = key(1.0)
    tasks: tuple = key(())


def qformer_flops(q: dict, num_query: int, length: int, n: int, di: int, cross_every: int) -> int:
    """Forward FLOPs of one Q-Former pass over Q queries and `length` text tokens: every
    block's self-attention and FFN over Q + L, the cross-attention blocks' over the N
    image tokens for the queries only."""
    d, m, depth = q["width"], q["mlp_dim"], q["depth"]
    s = num_query + length
    crosses = len(range(0, depth, cross_every)) if num_query else 0
    return depth * layer(s, d, m) + crosses * (cross_layer(num_query, d, m, n, di) - layer(num_query, d, m))


@register("blip2")
class Blip2Family(FeatureFamily):
    """BLIP-2 stage 1 for the generic train step and the evaluator: ITC retrieval by the
    max over query embeddings (`encode_image` -> [B, Q, E]), ITM re-ranking (keys: Blip2Config)."""

    Config = Blip2Config
    batch_keys = ("image", "text", "id")
    part_keys = {"vision": VISION_KEYS}
    TASKS = ("itc", "itm", "itg")

    def __init__(self, model_config):
        c = self.Config.parse(model_config)
        self.config, self.c = model_config, c
        self.image_size, self.text_len, self.num_frames = c.image_size, c.text_len, 0
        self.tasks = c.tasks or self.TASKS
        bad = [t for t in self.tasks if t not in self.TASKS]
        if bad:
            raise ValueError(f"model.tasks {bad} unknown; valid choices: {', '.join(self.TASKS)}")
        self.temp_range = tuple(float(x) for x in c.temp_range)
        if not (len(self.temp_range) == 2 and 0 < self.temp_range[0] <= self.temp_range[1]):
            raise ValueError(f"model.temp_range={c.temp_range!r}; expected (low, high) with 0 < low <= high")
        self.weights = {"itc": c.itc_weight, "itm": c.itm_weight, "itg": c.itg_weight}
        self.image_variant = parse_variant(c.image, c.image_overrides, kind="image")
        self.qformer_variant = parse_variant(c.qformer, c.qformer_overrides, kind="text")
        tok = c.tokens
        self.pad_id = tok.need("pad", "the Q-Former's text")
        self.model = Blip2(
            qformer=self.qformer_variant,
            embed_dim=c.embed_dim,
            vocab_size=c.need("vocab_size"),
            text_len=self.text_len,
            num_query=c.num_query,
            cross_every=c.cross_every,
            cls_id=tok.need("cls", "BLIP-2's ITC text [CLS]"),
            pad_id=self.pad_id,
            **vision_kw(c, self.image_variant),
            **c.module_kw(),
        )

    def init_params(self, rng, image_shape=None, text_shape=None, *, boxed=False):
        image = jnp.zeros(tuple(image_shape or self.image_shape()), jnp.float32)
        text = jnp.ones(tuple(text_shape or (1, self.text_len)), jnp.int32)
        params = self.model.init(rng, image, text)["params"]
        return params if boxed else nn.unbox(params)

    def param_bounds(self) -> dict:
        return {"temp": self.temp_range}

    def finish_init(self, params):
        """Params just loaded by finetune.init_parts: with model.query_ffn_init='text', each
        Q-Former block's `ln2_query` / `mlp_query` become copies of its `ln2` / `mlp` (a
        text tower's FFN loaded there: `{"qformer": "W:text_tower"}` from a BLIP workdir,
        whose blocks carry the Q-Former's names)."""
        if self.c.query_ffn_init != "text":
            return params
        qf = dict(params["qformer"])
        for name, block in qf.items():
            if name.startswith("block") and "mlp" in block:
                qf[name] = {**block, "mlp_query": block["mlp"], "ln2_query": block["ln2"]}
        return {**params, "qformer": qf}

    def temp(self, params):
        return jnp.clip(params["temp"], *self.temp_range)

    # --- the evaluator ------------------------------------------------------------
    def encode_image(self, params, image):
        """[B, S, S, 3] -> [B, Q, E]: one L2-normalised embedding per query (retrieval
        scores an image by the best of its queries: `eval.retrieval.similarity`)."""
        return self.image_features(params, image)[0]

    def encode_text(self, params, text):
        return self._apply(params, self.model.text_embedding, text)

    def image_features(self, params, image):
        """-> (query embeddings [B, Q, E], the image features [B, N, Di] ITM reads)."""
        feats = self._apply(params, self.model.vision_features, image)
        return self._apply(params, self.model.query_embeddings, feats), feats

    def text_features(self, params, text):
        """-> (emb [B, E], the token ids ITM re-encodes with the queries)."""
        return self.encode_text(params, text), text

    def itm_scores(self, params, image_feats, stream, text):
        """Log-odds that each (image, text) pair matches: [B, N, Di], (unused), [B, L] -> [B]."""
        del stream
        logits = self._apply(params, self.model.itm_logits, image_feats, text)
        return logits[:, 1] - logits[:, 0]

    def image_flops(self) -> int:
        """The vision tower and one queries-only Q-Former pass + the projection."""
        im, q = self.image_variant, self.qformer_variant
        n = (self.image_size // im["patch"]) ** 2 + 1
        qf = qformer_flops(q, self.c.num_query, 0, n, im["width"], self.c.cross_every)
        return vit(im, self.image_size) + qf + 2 * self.c.num_query * q["width"] * self.c.embed_dim

    # --- training -------------------------------------------------------------------
    def flops(self, batch: int) -> dict:
        """Student (what trains: ln_vision, the Q-Former, the heads): ITC / ITM's queries
        pass, text pass and projections; ITC's max-over-queries similarities 2*2*B*Q*E and
        positives 2*Q*E; ITM's similarities for the negatives (again 2*2*B*Q*E) and 3
        bidirectional passes over Q + L with the head on every query; ITG one causal pass
        and the tied head 2*L*D*V. Teacher: the frozen vision tower's forward (no backward)."""
        im, q, c, length = self.image_variant, self.qformer_variant, self.c, self.text_len
        n, nq, d, e = (self.image_size // im["patch"]) ** 2 + 1, c.num_query, q["width"], c.embed_dim
        pass_ = lambda qq, ll: qformer_flops(q, qq, ll, n, im["width"], c.cross_every)
        student = 0
        sims = 2 * 2 * batch * nq * e  # every image's Q embeddings against B texts, both directions
        if "itc" in self.tasks or "itm" in self.tasks:
            student += pass_(nq, 0) + pass_(0, length) + 2 * (nq + 1) * d * e
        if "itc" in self.tasks:
            student += sims + 2 * nq * e  # + the positives
        if "itm" in self.tasks:
            student += sims + 3 * (pass_(nq, length) + 2 * nq * d * 2)
        if "itg" in self.tasks:
            student += pass_(nq, length) + 2 * length * d * self.model.vocab_size
        return {"student": student, "teacher": vit(im, self.image_size)}

    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=identity):
        """-> (loss, metrics, {}). batch: image [b, S, S, 3], text [b, L] (bos ... eos pad),
        id [b] (same id = same image: never a negative)."""
        del teacher, queues, step
        m = self.model
        rng = jax.random.PRNGKey(0) if rng is None else rng
        image, text, ids = batch["image"], batch["text"], batch["id"].astype(jnp.int32)
        temp = self.temp(params)
        feats = self._apply(params, m.vision_features, image)
        metrics, loss, s = {}, 0.0, self.c.label_smoothing
        if "itc" in self.tasks or "itm" in self.tasks:
            q_emb = self._apply(params, m.query_embeddings, feats)
            t_emb = self._apply(params, m.text_embedding, text)
        if "itc" in self.tasks:
            l_itc, mi = itc_max_loss(q_emb, t_emb, temp, label_smoothing=s, gather=gather)
            loss, metrics = loss + self.weights["itc"] * l_itc, {**metrics, **mi, "loss_itc": l_itc}
        if "itm" in self.tasks:
            sim_i2t = jnp.max(jnp.einsum("bqe,Be->bBq", q_emb, gather(t_emb)), axis=-1) / temp
            sim_t2i = jnp.max(jnp.einsum("be,Bqe->bBq", t_emb, gather(q_emb)), axis=-1) / temp
            neg_txt, neg_img, labels, weights = hard_negative_pairs(
                jax.random.split(rng), sim_i2t, sim_t2i, ids, gather, text=text
            )
            feats_all, text_all = gather(feats), gather(text)
            logits = self._apply(
                params,
                m.itm_logits,
                jnp.concatenate([feats, feats, feats_all[neg_img]]),
                jnp.concatenate([text, text_all[neg_txt], text]),
            )
            l_itm, mi = itm_loss(logits, labels, weights, gather=gather)
            loss, metrics = loss + self.weights["itm"] * l_itm, {**metrics, **mi}
        if "itg" in self.tasks:
            logits = self._apply(params, m.lm_logits, feats, text)
            l_itg, mi = lm_loss(logits, text, label_smoothing=s, pad_id=self.pad_id, gather=gather)
            loss, metrics = loss + self.weights["itg"] * l_itg, {**metrics, **mi}
        metrics["loss"] = loss
        return loss, metrics, {}
