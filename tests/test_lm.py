"""The `lm` family end to end (configs/lm.py: a decoder LM trained on shapes_vqa
conversations rendered as text): the recipe trains and its perplexity is exp of the
token NLL recomputed here; a stopped run resumes exactly; `mmjax generate` (greedy
against an uncached argmax loop, sampling reproducible, beams=1 greedy, --stop, bad
flags); HF round trips through the CLI (`mmjax convert --from hf-llama` of a sharded
tiny Llama with its own tokenizer.json, generation equal to transformers', `mmjax
export --format hf-llm` back, and an mmjax-trained LM loading in transformers); two
sharded train steps equal to the single-device steps.

One tiny run (module fixture) serves every test; the models are random or trained for
a few steps, nothing is downloaded.
"""

import contextlib
import io
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mmjax import cli  # noqa: E402
from mmjax import config as config_lib  # noqa: E402
from mmjax import workdir as workdir_lib  # noqa: E402
from tiny import ROOT  # noqa: E402

LM = os.path.join(ROOT, "configs", "lm.py")
STEPS = 20
TOL = 1e-4  # max |logit difference| against transformers, fp32 (as tests/test_hf_llm.py)
PROMPTS = ["a red circle", "USER: what colour is the square? ASSISTANT:"]
TINY_LM = "{'width': 32, 'depth': 2, 'heads': 4, 'kv_heads': 2, 'mlp_dim': 64}"


def lm_overrides(data_dir, **extra) -> dict:
    """configs/lm.py shrunk to seconds: a 2-layer 32-wide LM (GQA 4 / 2 heads), 16px
    scenes (the images are unread), 256 train / 64 test records, 20 steps."""
    shapes = dict(image_size=16, num_train=256, num_validation=32, num_test=64)
    train = dict(batch_size=16, steps=STEPS, warmup_steps=3, log_every=1, ckpt_every=10)
    return {
        **{"data.data_dir": str(data_dir), "data.image_size": 16, "data.shuffle_buffer": 256, "model.lm": TINY_LM},
        **{f"data.shapes.{k}": v for k, v in shapes.items()},
        **{f"train.{k}": v for k, v in train.items()},
        **{"eval.every": 0, "eval.batch_size": 32, **extra},
    }


def _mmjax(*argv) -> tuple:
    """cli.main in this process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _train(workdir, data_dir, *flags) -> str:
    """`mmjax train --config configs/lm.py` with lm_overrides -> its stdout."""
    over = [f"--config.{k}={v}" for k, v in lm_overrides(data_dir).items()]
    code, out, err = _mmjax("train", "--config", LM, "--workdir", workdir, "--no-progress", *flags, *over)
    assert code == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """The 20-step run through the CLI: {'workdir', 'result' (the printed result line),
    'opened' (workdir_lib.Workdir)}."""
    workdir = str(tmp_path_factory.mktemp("lm") / "w")
    line = next(x for x in _train(workdir, data_dir).splitlines() if x.startswith("result:"))
    result = json.loads(line[len("result:") :])
    return {"workdir": workdir, "result": result, "opened": workdir_lib.open_workdir(workdir)}


@pytest.fixture(scope="module")
def eval_tokens(trained):
    """The test split's conversations as the perplexity eval renders them: int32 [N, L]
    (padding rows of the last batch dropped)."""
    from mmjax.data import pipeline
    from mmjax.data.chat_data import ChatCollator

    opened = trained["opened"]
    data = opened.config.data
    chat = ChatCollator(data, opened.tokenizer, text_len=int(data.text_len), split="test")
    batches = pipeline.make_eval_iterator(data, opened.tokenizer, "test", 32)
    encode = lambda b: chat.encode(chat.rows({**b, "id": np.maximum(b["id"], 0)}))["tokens"]
    return np.concatenate([encode(b)[np.asarray(b["valid"], bool)] for b in batches])


# ------------------------------------------------------------------ 1. the recipe trains
def _metrics(workdir, kind: str) -> list:
    """The rows of WORKDIR/metrics.jsonl of one kind ('train', 'eval'), in order."""
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r for r in rows if r["kind"] == kind]


def test_recipe_trains_and_perplexity_is_exp_token_nll(trained, eval_tokens):
    """The loss falls over 20 steps; the reported perplexity is exp(summed NLL / target
    tokens) over the test split, the NLL recomputed here in float64 from the family's
    logits (every non-pad token after the first a target), and token_nll agrees."""
    result, opened = trained["result"], trained["opened"]
    train = _metrics(trained["workdir"], "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    first, last = np.mean([r["loss"] for r in train[:3]]), np.mean([r["loss"] for r in train[-3:]])
    assert last < first - 0.1, (first, last)

    family, params, pad = opened.family, opened.params, opened.family.pad_id
    assert eval_tokens.shape == (64, int(opened.config.data.text_len)) and (eval_tokens[:, 0] != pad).all()
    z = np.asarray(jax.jit(family.text_logits)(params, eval_tokens), np.float64)[:, :-1]
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))  # log_softmax
    targets = eval_tokens[:, 1:]
    weight = targets != pad
    nll_rows = -np.take_along_axis(logp, targets[..., None], -1)[..., 0] * weight
    nll, count = nll_rows.sum(), weight.sum()
    got_nll, got_count = (np.asarray(x) for x in jax.jit(family.token_nll)(params, eval_tokens))
    np.testing.assert_allclose(got_nll, nll_rows.sum(1), rtol=1e-5)
    assert (got_count == weight.sum(1)).all()

    (ev,) = _metrics(trained["workdir"], "eval")
    assert result["eval_texts"] == 64 and result["eval_tokens"] == count and result["step"] == STEPS
    assert result["perplexity"] == round(ev["perplexity"], 4)  # the result line: 4 places
    np.testing.assert_allclose(ev["perplexity"], np.exp(nll / count), rtol=1e-5)
    np.testing.assert_allclose(ev["nll_per_token"], nll / count, rtol=1e-5)
    assert ev["perplexity"] < family.spec.vocab_size  # better than uniform


# ------------------------------------------------------------------ 2. exact resume
def test_stopped_run_resumes_exactly(trained, data_dir, tmp_path):
    """`mmjax train --stop-at 10`, then the same command again, ends at step 20 with the
    params of the uninterrupted run, bit for bit, and the same losses after the stop."""
    part = str(tmp_path / "part")
    _train(part, data_dir, "--stop-at", 10)
    assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == ["10"]
    _train(part, data_dir)
    want, step_a = workdir_lib.read_params(trained["workdir"])
    got, step_b = workdir_lib.read_params(part)
    assert step_a == step_b == STEPS
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    full, resumed = (_metrics(w, "train") for w in (trained["workdir"], part))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full] and len(full) == STEPS


# ------------------------------------------------------------------ 3. mmjax generate
def _generate(workdir, *flags, prompts=PROMPTS, n=5) -> list:
    """`mmjax generate` of `prompts` -> its JSON lines, parsed."""
    code, out, err = _mmjax("generate", "--workdir", workdir, "--max-new-tokens", n, *flags, *_prompt_flags(prompts))
    assert code == 0, err[-3000:]
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    assert len(lines) == len(prompts), out
    return lines


def _prompt_flags(prompts) -> list:
    return [x for p in prompts for x in ("--prompt", p)]


def _greedy_by_hand(family, params, prompt_ids, n, stop_ids, length=48) -> list:
    """Greedy continuation without a cache: the full forward over the prompt and what
    was generated so far (right-padded to `length`, so one compiled program), the
    argmax of the last real position's logits; stops at a stop id (not kept)."""
    assert len(prompt_ids) + n <= length
    logits_fn = jax.jit(family.text_logits)
    ids = list(prompt_ids)
    for _ in range(n):
        row = np.full((1, length), family.pad_id, np.int32)
        row[0, : len(ids)] = ids
        nxt = int(np.argmax(np.asarray(logits_fn(params, row))[0, len(ids) - 1]))
        if nxt in stop_ids or nxt == family.pad_id:
            break
        ids.append(nxt)
    return ids[len(prompt_ids) :]


def test_greedy_generation_is_the_argmax_loop(trained):
    """The KV-cached generation of two raw prompts of different lengths (one
    left-padded batch) gives the ids of an uncached argmax loop over text_logits from
    bos + the prompt's pieces, and their text."""
    from mmjax.eval.generation import generate_texts

    opened = trained["opened"]
    family, tok = opened.family, opened.tokenizer
    rows = generate_texts(family, opened.params, tok, PROMPTS, max_new_tokens=5, method="greedy")
    for prompt, row in zip(PROMPTS, rows):
        want = _greedy_by_hand(family, opened.params, [tok.bos_id, *tok.encode_plain(prompt)], 5, family.stop_ids())
        assert row["prompt"] == prompt and row["ids"] == want and row["text"] == tok.decode_plain(want), row
    assert any(row["ids"] for row in rows)


def test_generate_cli_prompt_is_the_training_chat_turn(trained):
    """`mmjax generate` on a chat-trained LM continues each prompt rendered as one user
    turn the way training rendered it (template and system prompt of data.chat): its
    ids equal the uncached argmax loop from those prompt ids."""
    from mmjax.data.conversations import Conversation, encode_prompt

    opened, chat = trained["opened"], trained["opened"].config.data.chat
    for prompt, row in zip(PROMPTS, _generate(trained["workdir"])):
        conv = Conversation([(prompt, None)], system=chat.system)  # as chat_data.record_conversation renders
        prompt_ids = encode_prompt(conv, opened.tokenizer, chat.template, image_tokens=0)["tokens"].tolist()
        want = _greedy_by_hand(opened.family, opened.params, prompt_ids, 5, opened.family.stop_ids())
        assert row["prompt"] == prompt and row["ids"] == want, (row, want)


def test_generate_cli_options(trained):
    """One JSON line per prompt, its text the ids decoded; sampling with one seed is
    reproducible; --beams 1 is greedy; --stop cuts the text (and the ids to match);
    --beams 2 with --temperature exits 2 with one line."""
    w, tok = trained["workdir"], trained["opened"].tokenizer
    greedy = _generate(w)
    assert [r["prompt"] for r in greedy] == PROMPTS
    assert all(len(r["ids"]) <= 5 and r["text"] == tok.decode_plain(r["ids"]) for r in greedy)
    sampled = [_generate(w, "--temperature", 0.7, "--top-p", 0.9, "--seed", 3) for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert all(len(r["ids"]) <= 5 and r["text"] == tok.decode_plain(r["ids"]) for r in sampled[0])
    assert _generate(w, "--beams", 1) == greedy

    row = max(greedy, key=lambda r: len(r["text"]))
    text = row["text"]
    stop = text[len(text) // 2 :][:3]
    assert stop, text
    cuts = _generate(w, "--stop", stop)  # both prompts: the greedy batch's shapes, nothing new to compile
    assert len(cuts[greedy.index(row)]["text"]) < len(text)
    for full, cut in zip(greedy, cuts):
        want = full["text"][: full["text"].find(stop)] if stop in full["text"] else full["text"]
        assert cut["text"] == want and stop not in cut["text"]
        assert cut["ids"] == full["ids"][: len(cut["ids"])] and tok.decode_plain(cut["ids"]).startswith(want)

    code, out, err = _mmjax("generate", "--workdir", w, "--prompt", "a", "--beams", 2, "--temperature", 0.7)
    assert code == 2 and not out.strip()
    assert err.strip().count("\n") == 0 and err.startswith("mmjax: error: ") and "--beams" in err, err


# ------------------------------------------------------------------ 4. HF round trips
@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random transformers Llama (GQA 6 / 3 heads, untied, saved in several
    shards) with a byte-level BPE tokenizer.json trained here: (dir, model, tokenizer)."""
    torch, transformers, tokenizers = (pytest.importorskip(m) for m in ("torch", "transformers", "tokenizers"))
    from tokenizers import decoders, models, pre_tokenizers, trainers

    torch.set_num_threads(1)
    d = str(tmp_path_factory.mktemp("hf_llama"))
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special, alphabet = ["<pad>", "<s>", "</s>", "<unk>"], pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=97, special_tokens=special, initial_alphabet=alphabet)
    tok.train_from_iterator(["a red circle left of a blue square", "What colour is the circle? red"] * 20, trainer)
    shape = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=64)
    heads = dict(num_attention_heads=6, num_key_value_heads=3, head_dim=8)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), **shape, **heads, **ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.08 * torch.randn_like(p))
    model.save_pretrained(d, max_shard_size="40KB")
    tok.save(os.path.join(d, "tokenizer.json"))
    names = dict(zip(("pad_token", "bos_token", "eos_token", "unk_token"), special))
    open(os.path.join(d, "tokenizer_config.json"), "w").write(json.dumps(names))
    assert sum(f.endswith(".safetensors") for f in os.listdir(d)) >= 3
    return d, model, tok


def _hf_logits(model, ids, mask=None):
    import torch

    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(np.asarray(mask, np.int64))}
        return model(input_ids=torch.tensor(np.asarray(ids, np.int64)), **kw).logits.float().numpy()


@pytest.fixture(scope="module")
def converted(hf_llama, tmp_path_factory):
    """`mmjax convert --from hf-llama` of the sharded tiny Llama -> the workdir."""
    src = hf_llama[0]
    w = str(tmp_path_factory.mktemp("converted") / "w")
    code, stdout, err = _mmjax("convert", "--from", "hf-llama", "--src", src, "--workdir", w)
    assert code == 0, err[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1]) == {"workdir": w, "from": "hf-llama", "src": src}
    return w


def test_converted_llama_generates_as_transformers(hf_llama, converted):
    """`mmjax generate --prompt "a red circle" --max-new-tokens 6` on the converted
    workdir: the ids (and text) of transformers' greedy generate from bos + the
    tokenizer's encoding of the prompt, cut at eos."""
    import torch

    _, model, tok = hf_llama
    prompt = "a red circle"
    (row,) = _generate(converted, prompts=[prompt], n=6)
    ids = [1] + tok.encode(prompt).ids
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6).numpy()[0, len(ids) :].tolist()
    stop = next((k for k, t in enumerate(hf) if t in (0, 2)), len(hf))  # eos ends it; a pad token ends mmjax's ids
    assert row["ids"] == hf[:stop] and row["text"] == tok.decode(hf[:stop]) and stop > 0, (row, hf)


def test_converted_llama_exports_back(hf_llama, converted, tmp_path):
    """`mmjax export --format hf-llm` of the converted workdir: a LlamaForCausalLM with
    the original model's logits, its tokenizer files beside it (encoding as before)."""
    import tokenizers
    import transformers

    _, model, tok = hf_llama
    out = str(tmp_path / "out")
    code, stdout, err = _mmjax("export", "--workdir", converted, "--format", "hf-llm", "--out", out)
    assert code == 0, err[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["format"], summary["layout"], summary["out"], summary["step"]) == ("hf-llm", "hf-llama", out, 0)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(os.listdir(out))
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    test_ids = np.random.RandomState(0).randint(0, tok.get_vocab_size(), size=(2, 11))
    diff = np.abs(_hf_logits(exported, test_ids) - _hf_logits(model, test_ids)).max()
    assert diff <= TOL, diff
    again = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert again.encode("a red circle").ids == tok.encode("a red circle").ids


def test_mmjax_trained_lm_exports_to_transformers(trained, eval_tokens, tmp_path):
    """The LM trained by mmjax, exported with --format hf-llm, is a LlamaForCausalLM
    (tied embeddings) whose logits on held-out conversations equal text_logits; its
    sentencepiece tokenizer travels with it."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "out")
    code, stdout, err = _mmjax("export", "--workdir", trained["workdir"], "--format", "hf-llm", "--out", out)
    assert code == 0, err[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["step"] == STEPS
    assert "tokenizer.model" in os.listdir(out)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    opened = trained["opened"]
    ids = eval_tokens[:8]
    valid = ids != opened.family.pad_id
    ours = np.asarray(jax.jit(opened.family.text_logits)(opened.params, ids))
    diff = np.abs(ours - _hf_logits(model.eval(), ids, valid))[valid].max()
    assert diff <= TOL, diff


# ------------------------------------------------------------------ 5. sharded step
def _tiny_family(data_dir):
    from mmjax.models import zoo

    config = config_lib.load(LM, [f"{k}={v}" for k, v in lm_overrides(data_dir, **{"data.text_len": 16}).items()])
    config = config_lib.derive_model_keys(config, 40)
    return zoo.build(config.model), config.train


def test_sharded_step_equals_single_device(data_dir):
    """Two train steps of the lm family on an (fsdp, tensor) mesh of the 8 host devices
    give the single device's losses and params; the params really are split."""
    from test_albef import _batch
    from test_parallel import run

    family, train_cfg = _tiny_family(data_dir)
    s = family.spec  # what the overrides describe: head_dim = width / heads, tied embeddings, eos stops
    assert (s.vocab_size, s.width, s.depth, s.heads, s.kv_heads, s.head_dim, s.mlp_dim) == (40, 32, 2, 4, 2, 8, 64)
    assert s.tie_embeddings and family.stop_ids() == (family.eos_id,) and family.can("generate")
    batches = [{"text": _batch(s)["text"]} for s in range(2)]
    ref_loss, ref_state, _ = run(family, train_cfg, batches, "mesh", {"data": 1}, jax.devices()[:1])
    loss, state, shard = run(family, train_cfg, batches, "mesh", {"fsdp": 4, "tensor": 2})
    specs = [str(s.spec) for s in jax.tree_util.tree_leaves(shard.params)]
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
    assert np.all(np.isfinite(loss)) and ref_loss[0] > 0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert jax.tree.structure(state.params) == jax.tree.structure(ref_state.params)
    for (path, v), got in zip(jax.tree_util.tree_leaves_with_path(ref_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(got, v, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_eos_that_is_also_pad_is_attended_and_predicted():
    """An LLM tokenizer without a pad token pads with its eos (HFTokenizer's fallback):
    the first pad of a row is then the text's eos, and the loss predicts it; a numpy
    cross entropy over exactly those targets is the reference."""
    import jax

    from mmjax.models import zoo

    lm = dict(width=32, depth=2, heads=4, kv_heads=2, mlp_dim=64)
    ids = np.array([[1, 7, 8, 2, 2, 2], [1, 9, 2, 2, 2, 2]], np.int32)
    for pad, want in ((2, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]), (0, [[1] * 6, [1] * 6])):
        tokens = dict(pad=pad, unk=None, bos=1, eos=2, mask=None, cls=None)
        fam = zoo.build(dict(family="lm", vocab_size=16, text_len=6, lm=lm, token_ids=tokens))
        params = fam.init_params(jax.random.PRNGKey(0))
        valid = np.asarray(fam.valid(ids))
        np.testing.assert_array_equal(valid, np.array(want, bool))
        loss = float(fam.objective(params, {"text": ids})[0])
        logits = np.asarray(fam.text_logits(params, ids), np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
        np.testing.assert_allclose(loss, (nll * valid[:, 1:]).sum() / valid[:, 1:].sum(), rtol=1e-5)
