"""A user's LLaVA-format conversations as training data (`data.name='llava_json'`,
data.chat.task='llava'): malformed records and missing images skipped and counted,
the batch's loss tokens are exactly the gpt turns' answers (with the turn's end),
each row's image slots at its <image> place, the pixels the listed image's."""

import json

import numpy as np
import pytest
from PIL import Image

from mmjax import config as config_lib
from mmjax.data import pipeline
from mmjax.data.tokenizer import Tokenizer, train_tokenizer
from tiny import ROOT

ANSWERS = ["red", "a blue square", "yes", "green", "no"]


@pytest.fixture(scope="module")
def llava_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    rng = np.random.default_rng(0)
    records = []
    for i, answer in enumerate(ANSWERS):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
        turns = [{"from": "human", "value": f"<image>\nwhat is object {i}?"}, {"from": "gpt", "value": answer}]
        if i % 2:  # a second round
            turns += [{"from": "human", "value": "and the other one?"}, {"from": "gpt", "value": "blue"}]
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": turns})
    records.append({"id": "gone", "image": "missing.png", "conversations": records[0]["conversations"]})
    records.append({"id": "bad", "image": "0.png", "conversations": [{"from": "gpt", "value": "no question"}]})
    path = d / "conv.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    texts = [t["value"].replace("<image>\n", "") for r in records for t in r["conversations"]]
    tok = Tokenizer(train_tokenizer(texts * 20 + ["user: assistant: ?"], str(d / "tok"), 60), lowercase=True)
    return str(path), tok


def _config(path, tok_path):
    over = [
        "data.name=llava_json",
        f"data.path={path}",
        "data.image_size=16",
        "data.text_len=96",
        "data.chat.task=llava",
        "data.chat.system=''",
        "data.shuffle_buffer=8",
        "data.augment.crop_scale=(1.0, 1.0)",
        f"data.tokenizer.path={tok_path}",
    ]
    cfg = config_lib.load(f"{ROOT}/configs/llava.py:stage2", over)
    with cfg.unlocked():
        cfg.data.chat.image_tokens = 4
    return cfg


def test_llava_json_trains_on_the_answers(llava_file):
    from mmjax.data.sources.llava_json import LlavaJsonSource  # not at collection: registration order

    path, tok = llava_file
    cfg = _config(path, tok.model_path)
    source = LlavaJsonSource(cfg.data)
    assert source.num_examples("train") == len(ANSWERS) and source.dropped("train") == 2  # missing image, malformed
    batch = next(iter(pipeline.make_train_iterator(cfg.data, tok, len(ANSWERS), seed=0)))
    assert batch["image"].shape == (len(ANSWERS), 16, 16, 3)
    for i in range(len(ANSWERS)):
        rid = int(batch["id"][i])
        slots = np.flatnonzero(batch["image_slots"][i])
        assert len(slots) == 4 and np.all(np.diff(slots) == 1)
        runs, cur = [], []
        for t, m in zip(batch["tokens"][i], batch["loss_mask"][i]):
            if m:
                cur.append(int(t))
            elif cur:
                runs.append(cur)
                cur = []
        runs += [cur] if cur else []
        want = [ANSWERS[rid]] + (["blue"] if rid % 2 else [])
        assert [tok.decode_plain([t for t in r if t != tok.eos_id]).strip() for r in runs] == want
        assert all(r[-1] == tok.eos_id for r in runs)  # vicuna: the answer's turn ends with eos
        assert not batch["loss_mask"][i][slots].any() and batch["valid"][i][slots].all()
    assert source.captions("train") and "what is object 0?" in source.captions("train")
