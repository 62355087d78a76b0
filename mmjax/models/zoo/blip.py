"""BLIP: one text transformer used three ways, an EMA teacher and feature queues.

Shape letters: B global batch, b local rows, T image tokens, L text length,
Di image width, D text width, E embed dim, V vocabulary.

Model (MODELS.md, BLIP; Li et al. 2022): a ViT ([CLS] pooled, all T tokens for
cross-attention) and one text transformer run in three modes:

- 'text': the unimodal text encoder. Bidirectional self-attention, no
  cross-attention; the first token is replaced by <cls> (id 5) and its output
  (final LayerNorm, projection) is the ITC text embedding.
- 'encode': the image-grounded text encoder. Bidirectional self-attention and
  cross-attention to the image tokens in every block. BLIP's [Encode] token has no
  piece in mmjax's tokenizer, so it is a learned embedding `enc_token` [D] that
  replaces the first token's word embedding (position 0's embedding is kept);
  its output feeds the ITM head Linear(D, 2).
- 'decode': the image-grounded text decoder. Causal self-attention and the same
  cross-attention; bos (id 2) plays [Decode]. LM head: the final LayerNorm, the
  tied word embeddings and a bias.

Encoder and decoder share every parameter except the self-attention layers, and
the sharing is structural: each `BlipBlock` holds `ln1`+`attn` (encoder
self-attention), `ln1_dec`+`attn_dec` (decoder self-attention) and the shared
`ln_cross`+`cross_attn` and `ln2`+`mlp`; the word / position embeddings,
`ln_final` and the LM `bias` exist once, in `text_tower`. mmjax blocks are pre-LN
(the release's BERT is post-LN), with one final LayerNorm for every mode.

Objective = itc_weight * ITC (momentum distillation against the teacher's
features of the batch and of the queues) + itm_weight * ITM (hard negatives over
the global batch) + lm_weight * LM (label smoothing 0.1, BLIP's); weights 1. The
teacher (`ema_params`) is a full copy of the params like ALBEF's, though only its
image tower + `image_proj` and unimodal text mode + `text_proj` are read (BLIP's
momentum encoders); keeping the whole tree lets `--weights ema` evaluate and
caption.
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import MultiHeadAttention, causal_mask, combine_masks, padding_mask
from mmjax.models.decoder import beam_search, greedy_decode
from mmjax.models.embed import WordEmbed
from mmjax.models.fusion import ItmHead, head_dense
from mmjax.models.transformer import Mlp, maybe_remat, remat_mode
from mmjax.models.variants import parse_variant
from mmjax.models.vit import ViT
from mmjax.models.zoo.clip import DTYPES, l2_normalize
from mmjax.models.zoo.common import MomentumFamily, attention_spec, video_options
from mmjax.objectives import alpha_at, enqueue, identity, itc_distill_loss, itm_loss, lm_loss
from mmjax.parallel.sharding import constrain, names, norm_init

Dtype = Any
PAD_ID, BOS_ID, EOS_ID, CLS_ID = 0, 2, 3, 5  # mmjax tokenizer ids; bos = [Decode], <cls> = ITC's [CLS]
MODES = ("text", "encode", "decode")


class BlipBlock(nn.Module):
    """Pre-LN block, one param set for the three modes (module docstring).

    `__call__(x [B,L,D], self_mask, memory [B,T,Di] | None, memory_mask, mode)`:
    x + SelfAttn(LN(x)) with `attn` ('text', 'encode') or `attn_dec` ('decode');
    x + CrossAttn(LN(x), memory) with the shared `cross_attn` (not in 'text');
    x + Mlp(LN(x)) with the shared `mlp`. The causal mask comes with `self_mask`.
    """

    num_heads: int
    mlp_dim: int
    decode: bool = False  # KV caches for captioning (decoder self-attention, cross-attention)
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, self_mask, memory_BxTxDi=None, memory_mask=None, mode: str = "text"):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dec = mode == "decode"
        sfx = "_dec" if dec else ""
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
        h = nn.LayerNorm(name="ln1" + sfx, **kw, **norm_init())(x_BxLxD)
        x_BxLxD = x_BxLxD + MultiHeadAttention(
            self.num_heads, attention=self.attention, decode=self.decode and dec, name="attn" + sfx, **kw
        )(h, mask=self_mask)
        if mode != "text":
            h = nn.LayerNorm(name="ln_cross", **kw, **norm_init())(x_BxLxD)
            x_BxLxD = x_BxLxD + MultiHeadAttention(
                self.num_heads, attention=self.attention, decode=self.decode and dec, name="cross_attn", **kw
            )(h, inputs_kv=memory_BxTxDi, mask=memory_mask)
        h = nn.LayerNorm(name="ln2", **kw, **norm_init())(x_BxLxD)
        return x_BxLxD + Mlp(self.mlp_dim, name="mlp", **kw)(h)


class BlipText(nn.Module):
    """BLIP's text transformer. Params: `embed` (token/embedding, pos_embedding),
    `enc_token` [D], `block<i>` (BlipBlock), `ln_final`, `bias` [V].

    `run(ids, mode, memory, memory_valid) -> [B, L, D]` (after ln_final);
    `logits(y) -> [B, L, V]`; `__call__(ids, memory, memory_valid=None,
    positions_L=None) -> [B, L, V]` is the decoder mode with TextDecoder's
    interface, so `decoder.greedy_decode` / `beam_search` drive it (`decode=True`:
    cached decoder self-attention and cross-attention keys / values).
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    decode: bool = False
    remat: Any = "none"
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed = WordEmbed(self.vocab_size, self.width, self.max_len, **kw)
        self.enc_token = self.param(
            "enc_token", names(nn.initializers.normal(0.02), "embed"), (self.width,), self.param_dtype
        )
        # mode (argument 5, counting self) is a python string: static under remat.
        block_cls = BlipBlock if self.decode else maybe_remat(BlipBlock, self.remat, static_argnums=(5,))
        self.blocks = [
            block_cls(self.num_heads, self.mlp_dim, self.decode, self.attention, name=f"block{i:02d}", **kw)
            for i in range(self.depth)
        ]
        self.ln_final = nn.LayerNorm(**kw, **norm_init())
        self.bias = self.param("bias", names(nn.initializers.zeros, "vocab"), (self.vocab_size,), self.param_dtype)

    def embed_tokens(self, ids_BxL, mode: str, positions_L=None):
        """Word + position embeddings; position 0 becomes <cls> ('text') or the
        learned [Encode] embedding ('encode'); 'decode' keeps bos = [Decode]."""
        chex.assert_rank(ids_BxL, 2)
        if mode == "text":
            ids_BxL = ids_BxL.at[:, 0].set(CLS_ID)
        x_BxLxD = self.embed(ids_BxL, positions_L)
        if mode == "encode":
            enc_D = jnp.asarray(self.enc_token, x_BxLxD.dtype) + jnp.asarray(self.embed.pos[0], x_BxLxD.dtype)
            x_BxLxD = x_BxLxD.at[:, 0].set(jnp.broadcast_to(enc_D, x_BxLxD[:, 0].shape))
        return x_BxLxD

    def self_mask(self, ids_BxL, mode: str, positions_L=None):
        """Key padding (+ causal in 'decode'); None for a cached decoding step."""
        if self.decode and positions_L is not None:
            return None
        return combine_masks(
            padding_mask(ids_BxL != PAD_ID), causal_mask(ids_BxL.shape[1]) if mode == "decode" else None
        )

    def run(self, ids_BxL, mode: str, memory_BxTxDi=None, memory_valid_BxT=None, positions_L=None):
        if mode not in MODES:
            raise ValueError(f"BLIP text mode {mode!r}; valid choices: {', '.join(MODES)}")
        if (memory_BxTxDi is None) != (mode == "text"):
            raise ValueError(f"BLIP text mode {mode!r} {'takes no' if mode == 'text' else 'needs'} image tokens")
        x = self.embed_tokens(ids_BxL, mode, positions_L)
        mask = self.self_mask(ids_BxL, mode, positions_L)
        memory_mask = None if memory_valid_BxT is None else padding_mask(memory_valid_BxT)
        for block in self.blocks:
            x = block(x, mask, memory_BxTxDi, memory_mask, mode)
        return self.ln_final(x)

    def logits(self, y_BxLxD):
        # float32 logits: float32 accumulation in WordEmbed.attend, the bias added in float32.
        return self.embed.attend(y_BxLxD) + jnp.asarray(self.bias, jnp.float32)[None, None]

    def __call__(self, ids_BxL, memory_BxTxDi, memory_valid_BxT=None, positions_L=None):
        chex.assert_rank(memory_BxTxDi, 3)
        return self.logits(self.run(ids_BxL, "decode", memory_BxTxDi, memory_valid_BxT, positions_L))


class BLIP(nn.Module):
    """ViT + BlipText + projections + ITM head.

    Methods (apply with `method=`): `image_features(image) -> (emb [B,E], tokens
    [B,T,Di])`, `text_features(ids) -> (emb [B,E], unimodal states [B,L,D])`,
    `itm_logits(image_tokens, ids) -> [B,2]`, `lm_logits(image_tokens, ids) ->
    [B,L,V]`; `__call__(image, ids)` runs every mode and touches every param.
    """

    image: Any
    text: Any
    embed_dim: int
    vocab_size: int
    text_len: int
    remat: Any = False  # False | 'none' | True | 'full' | 'dots' (transformer.REMAT_POLICIES)
    attention: str = "xla"  # 'xla' | 'cudnn', '/N' pads lengths to a multiple of N (attention.py)
    scan: bool = False  # nn.scan over the image tower's blocks
    video: Any = None  # ViT video keywords (common.video_options); None: an image model
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        im, tx = self.image, self.text
        self.image_tower = ViT(
            im["patch"],
            im["width"],
            im["depth"],
            im["heads"],
            im["mlp_dim"],
            pool="cls",
            posemb="learn",
            remat=self.remat,
            attention=self.attention,
            scan=self.scan,
            **dict(self.video or {}),
            **kw,
        )
        self.text_tower = BlipText(
            self.vocab_size,
            self.text_len,
            tx["width"],
            tx["depth"],
            tx["heads"],
            tx["mlp_dim"],
            remat=remat_mode(self.remat),
            attention=self.attention,
            **kw,
        )
        self.image_proj = head_dense(self.embed_dim, name="image_proj", param_dtype=self.param_dtype)  # float32 heads
        self.text_proj = head_dense(self.embed_dim, name="text_proj", param_dtype=self.param_dtype)
        self.itm_head = ItmHead(**kw)
        self.temp = self.param("temp", names(nn.initializers.constant(0.07)), (), jnp.float32)

    def image_features(self, image_BxHxWx3):
        chex.assert_rank(image_BxHxWx3, {4, 5})  # images, or clips [B, T, H, W, 3]
        pooled, aux = self.image_tower(image_BxHxWx3)
        return l2_normalize(self.image_proj(pooled)), aux["tokens"]

    def text_features(self, ids_BxL):
        y_BxLxD = self.text_tower.run(ids_BxL, "text")
        return l2_normalize(self.text_proj(y_BxLxD[:, 0])), y_BxLxD

    def itm_logits(self, image_BxTxDi, ids_BxL):
        return self.itm_head(self.text_tower.run(ids_BxL, "encode", image_BxTxDi)[:, 0]).astype(jnp.float32)

    def lm_logits(self, image_BxTxDi, ids_BxL):
        return self.text_tower(ids_BxL, image_BxTxDi)

    def __call__(self, image, ids):
        img_emb, img_tok = self.image_features(image)
        txt_emb, _ = self.text_features(ids)
        return img_emb, txt_emb, self.itm_logits(img_tok, ids), self.lm_logits(img_tok, ids)


class BlipFamily(MomentumFamily):
    """BLIP for the generic train step, the evaluator (ITC retrieval, ITM re-ranking,
    captions) and `mmjax caption`.

    model_config fields (besides CLIP's image/text/overrides/embed_dim/dtype):
    queue_size, momentum, momentum_final (None = constant), alpha,
    alpha_ramp_steps, temp_range (default BLIP's (0.001, 0.5)), tasks (subset of
    itc, itm, lm; default all), itc_weight / itm_weight / lm_weight (1.0 each),
    label_smoothing (LM; default BLIP's 0.1), remat, attention, scan_layers.
    """

    batch_keys = ("image", "text", "id")
    TASKS = ("itc", "itm", "lm")

    def __init__(self, model_config):
        cfg = model_config
        self.config = cfg
        self.image_size = int(cfg.get("image_size", 224))
        self.text_len = int(cfg.get("text_len", 30))
        self.num_frames = video_options(cfg)["num_frames"]
        self._momentum_config(cfg, queue_size=57600)
        self.label_smoothing = float(cfg.get("label_smoothing", 0.1))
        self.weights = {t: float(cfg.get(f"{t}_weight", 1.0)) for t in self.TASKS}
        self.tasks = self._tasks(cfg)
        for key, value, ok, want in [
            ("label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "in [0, 1)"),
            *[(f"{t}_weight", w, w >= 0, "a non-negative number") for t, w in self.weights.items()],
        ]:
            if not ok:
                raise ValueError(f"model.{key}={value!r}; expected {want}")
        self.embed_dim = int(cfg.embed_dim)
        text = parse_variant(cfg.text, cfg.get("text_overrides", None), kind="text")
        kw = dict(
            attention=attention_spec(cfg),
            dtype=DTYPES[cfg.get("dtype", "float32")],
            param_dtype=DTYPES[cfg.get("param_dtype", None) or "float32"],
        )
        self.model = BLIP(
            image=parse_variant(cfg.image, cfg.get("image_overrides", None), kind="image"),
            text=text,
            embed_dim=self.embed_dim,
            vocab_size=int(cfg.vocab_size),
            text_len=self.text_len,
            remat=remat_mode(cfg.get("remat", False)),
            scan=bool(cfg.get("scan_layers", False)),
            video=video_options(cfg),
            **kw,
        )
        # The decoder mode alone (params: params['text_tower']), for cached captioning.
        self.decoder = BlipText(
            int(cfg.vocab_size), self.text_len, text["width"], text["depth"], text["heads"], text["mlp_dim"], **kw
        )

    # --- objective ----------------------------------------------------------------
    def objective(self, params, batch, rng=None, *, teacher=None, queues=None, step=None, gather=identity):
        """-> (loss, metrics, updates={'queues': new queues} when ITC runs).

        batch: image [b,H,W,3] f32, text [b,L] i32 (bos ... eos pad), id [b] i32
        (same id = same image; never a negative). `teacher` (ema params) and
        `queues` come from the state (`init_extra`).
        """
        m = self.model
        image, ids, text = batch["image"], batch["id"].astype(jnp.int32), batch["text"]
        step = jnp.zeros((), jnp.int32) if step is None else step
        rng = jax.random.PRNGKey(0) if rng is None else rng
        alpha = alpha_at(step, self.alpha, self.alpha_ramp_steps)
        temp = self.temp(params)
        img_emb, img_tok = self._apply(params, m.image_features, image)
        metrics, loss, updates = {"alpha": alpha}, 0.0, {}
        if "itc" in self.tasks or "itm" in self.tasks:
            txt_emb, _ = self._apply(params, m.text_features, text)

        if "itc" in self.tasks:
            if teacher is None or queues is None:
                raise ValueError(
                    "BLIP's ITC needs the teacher and the queues (family.init_extra); or leave 'itc' out of model.tasks"
                )
            teacher = jax.lax.stop_gradient(teacher)
            t_img, _ = self._apply(teacher, m.image_features, image)
            t_txt, _ = self._apply(teacher, m.text_features, text)
            l_itc, mi = itc_distill_loss(img_emb, txt_emb, ids, t_img, t_txt, queues, temp, alpha, gather=gather)
            loss, metrics = loss + self.weights["itc"] * l_itc, {**metrics, **mi}
            updates["queues"] = enqueue(queues, gather(t_img), gather(t_txt), gather(ids))

        if "itm" in self.tasks:
            neg_txt, neg_img, labels, weights = self.itm_pairs(
                jax.random.split(rng), img_emb, txt_emb, ids, temp, gather, text=text
            )
            text_all, img_tok_all = gather(text), gather(img_tok)
            # Rows: (image, its text), (image, a hard negative text), (a hard negative image, text).
            logits = self._apply(
                params,
                m.itm_logits,
                jnp.concatenate([img_tok, img_tok, img_tok_all[neg_img]]),
                jnp.concatenate([text, text_all[neg_txt], text]),
            )
            l_itm, mi = itm_loss(logits, labels, weights, gather=gather)
            loss, metrics = loss + self.weights["itm"] * l_itm, {**metrics, **mi}

        if "lm" in self.tasks:
            logits = self._apply(params, m.lm_logits, img_tok, text)
            l_lm, mi = lm_loss(logits, text, label_smoothing=self.label_smoothing, gather=gather)
            loss, metrics = loss + self.weights["lm"] * l_lm, {**metrics, **mi}

        metrics["loss"] = loss
        return loss, metrics, updates

    # --- evaluation ----------------------------------------------------------------
    def text_features(self, params, text):
        """-> (emb [B, E], text [B, L]): BLIP's ITM re-encodes the token ids with the
        image-grounded encoder, so the ids are what `itm_scores` consumes."""
        return self._apply(params, self.model.text_features, text)[0], text

    def itm_scores(self, params, image_tokens, stream, text):
        """Log-odds that each (image, text) pair matches: [B,T,Di], (unused), [B,L] -> [B]."""
        del stream
        logits = self._apply(params, self.model.itm_logits, image_tokens, text)
        return logits[:, 1] - logits[:, 0]

    def caption(self, params, image, *, max_len=None, beams: int = 1, length_penalty: float = 0.6):
        """Token ids [B, max_len] (bos first, PAD after eos): greedy, or beam search;
        the decoder mode cross-attends to every image token."""
        max_len = int(max_len or self.text_len)
        _, memory = self._apply(params, self.model.image_features, image)
        kw = dict(max_len=max_len, bos_id=BOS_ID, eos_id=EOS_ID)
        if beams > 1:
            return beam_search(
                self.decoder, params["text_tower"], memory, beams=beams, length_penalty=length_penalty, **kw
            )[0]
        return greedy_decode(self.decoder, params["text_tower"], memory, **kw)
