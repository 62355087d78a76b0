"""The workdir layer (`mmjax.workdir`): one params-only reader, bit-identical to a full
restore of the train state whatever mesh wrote it, student or EMA, onto a mesh or the
host; damaged steps passed over; what `mmjax convert` writes is what
`mmjax finetune --init-from` reads; no import circle and no `mmjax.train` below train."""

import ast
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmjax import checkpoint as ckpt_lib
from mmjax import checkpoint_manifest as manifest_lib
from mmjax import workdir as workdir_lib
from mmjax.models import zoo
from mmjax.parallel import mesh as mesh_lib
from mmjax.parallel.sharding import path_str
from mmjax.train import setup as setup_lib
from tiny import ROOT, albef_config, tiny_config, tiny_overrides

STEPS = {"train.steps": 3, "eval.at_end": False}
MESH_222 = "{'data': 2, 'fsdp': 2, 'tensor': 2}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _write_steps(config, workdir, steps):
    """A workdir whose checkpoints at `steps` hold different params, written by Setup on
    the config's mesh (no training: the layer reads what the loop's checkpointer writes)."""
    setup = setup_lib.Setup(config, workdir)
    workdir_lib.save_config_json(config, workdir)
    state = setup.fresh_state()
    for s in steps:
        state = state.replace(params=jax.tree.map(lambda x: x * 0.5 + 0.25, state.params))
        setup.save(s, state, {"data_position": s})
    setup.checkpointer.close()
    return str(workdir)


@pytest.fixture(scope="module")
def clip_wd(data_dir, tmp_path_factory):
    """A CLIP workdir with steps 3 and 5 written on a data x fsdp x tensor = 2x2x2 mesh."""
    config = tiny_config(data_dir, **STEPS, **{"parallel.mesh": MESH_222})
    return _write_steps(config, tmp_path_factory.mktemp("clip"), (3, 5))


@pytest.fixture(scope="module")
def albef_wd(data_dir, tmp_path_factory):
    """An ALBEF workdir (a student unlike its EMA teacher) at step 7."""
    return _write_steps(albef_config(data_dir, **STEPS), tmp_path_factory.mktemp("albef"), (7,))


def _full_restore(workdir, step=None, mesh=None):
    """(state as host numpy, step): today's full restore of the TrainState with Setup."""
    config = workdir_lib.load_config_json(workdir)
    with config.unlocked():
        config.parallel.mesh = mesh or {"data": -1, "fsdp": 1, "tensor": 1}
    setup = setup_lib.Setup(config, workdir)
    state, _ = setup.restore(step)
    setup.checkpointer.close()
    return jax.tree.map(np.asarray, jax.device_get(setup.to_checkpoint_layout(state))), setup.checkpointer.restored_step


def _assert_bits_equal(a, b):
    fa = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(a)[0]}
    fb = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(b)[0]}
    assert fa and sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        assert fa[k].tobytes() == fb[k].tobytes(), k


def test_params_only_read_equals_the_full_restore(clip_wd):
    """Written sharded over 2x2x2, read params-only onto one device: bit for bit the
    params of a full TrainState restore, at the newest step and at an older one."""
    opened = workdir_lib.open_workdir(clip_wd)
    full, step = _full_restore(clip_wd)
    assert opened.step == step == 5
    _assert_bits_equal(opened.params, full.params)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(opened.params))
    older = workdir_lib.open_workdir(clip_wd, step=3)
    _assert_bits_equal(older.params, _full_restore(clip_wd, 3, mesh={"data": 4, "fsdp": 2, "tensor": 1})[0].params)
    assert not np.array_equal(jax.tree.leaves(older.params)[0], jax.tree.leaves(opened.params)[0])
    # config, family and tokenizer of the workdir
    assert opened.config.model.to_dict() == workdir_lib.load_config_json(clip_wd).model.to_dict()
    assert type(opened.family) is type(zoo.build(opened.config.model))
    assert opened.config.model.family == "clip" and opened.config.model.image_size == 16
    assert opened.tokenizer.model_path == os.path.join(clip_wd, "tokenizer.model")
    assert opened.tokenizer.vocab_size == opened.config.model.vocab_size


def test_ema_and_student_read_as_the_full_restore(albef_wd, clip_wd):
    full, _ = _full_restore(albef_wd)
    student = workdir_lib.open_workdir(albef_wd, weights="student")
    ema = workdir_lib.open_workdir(albef_wd, weights="ema")
    _assert_bits_equal(student.params, full.params)
    _assert_bits_equal(ema.params, full.ema_params)
    assert not np.array_equal(jax.tree.leaves(student.params)[0], jax.tree.leaves(ema.params)[0])
    with pytest.raises(ValueError, match="'clip' run in .* has no EMA teacher"):
        workdir_lib.open_workdir(clip_wd, weights="ema")
    with pytest.raises(ValueError, match="weights 'teacher'; valid choices: student, ema"):
        workdir_lib.open_workdir(clip_wd, weights="teacher")


def test_read_onto_a_mesh(clip_wd):
    """With a run's param shardings, the params land sharded on its mesh (what
    `mmjax eval` needs for a params-only checkpoint); the values are the host read's."""
    config = workdir_lib.load_config_json(clip_wd)
    with config.unlocked():
        config.parallel.mesh = {"data": 2, "fsdp": 4, "tensor": 1}
    setup = setup_lib.Setup(config, clip_wd)
    setup.checkpointer.close()
    params, step = workdir_lib.read_params(clip_wd, sharding=setup.state_sharding.params)
    assert step == 5
    got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, params))
    assert got == jax.tree.leaves(setup.state_sharding.params)
    assert any(not s.is_fully_replicated for s in got)  # fsdp really shards some
    _assert_bits_equal(jax.device_get(params), workdir_lib.open_workdir(clip_wd).params)
    rep = mesh_lib.replicated(setup.mesh)
    params, _ = workdir_lib.read_params(clip_wd, sharding=rep)
    assert all(x.sharding == rep for x in jax.tree.leaves(params))


def _damage(workdir, step):
    state = os.path.join(workdir, "checkpoints", str(step), "state")
    files = [os.path.join(r, n) for r, _, ns in os.walk(state) for n in ns]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_damaged_and_missing_steps(clip_wd, tmp_path):
    wd = str(tmp_path / "wd")
    shutil.copytree(clip_wd, wd)
    _damage(wd, 5)
    opened = workdir_lib.open_workdir(wd)  # the newest step that verifies
    assert opened.step == 3
    _assert_bits_equal(opened.params, workdir_lib.open_workdir(clip_wd, step=3).params)
    with pytest.raises(ckpt_lib.CheckpointError, match="step 5: state/.*CRC32"):
        workdir_lib.open_workdir(wd, step=5)
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 4"):
        workdir_lib.open_workdir(wd, step=4)
    _damage(wd, 3)
    with pytest.raises(ckpt_lib.CheckpointError, match="no usable checkpoint .*step 5: .*step 3: "):
        workdir_lib.open_workdir(wd)
    shutil.rmtree(os.path.join(wd, "checkpoints"))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        workdir_lib.open_workdir(wd)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        workdir_lib.open_workdir(str(tmp_path / "nothing"))


def test_an_unverified_step_that_does_not_read(clip_wd, tmp_path):
    """A step without a manifest (an older mmjax's) is read unverified; when its files do
    not read, the previous step is read, and with none left one clear error naming each."""
    wd = str(tmp_path / "wd")
    shutil.copytree(clip_wd, wd)
    step_dir = os.path.join(wd, "checkpoints", "5")
    os.remove(os.path.join(step_dir, manifest_lib.MANIFEST))
    files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "state")) for n in ns]
    for path in files:
        if "metadata" not in os.path.basename(path).lower():
            open(path, "wb").close()  # truncated to nothing
    opened = workdir_lib.open_workdir(wd)  # passed over, as a full restore passes over it
    assert opened.step == 3
    _assert_bits_equal(opened.params, workdir_lib.open_workdir(clip_wd, step=3).params)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoint step 5 in .*: student params unreadable"):
        workdir_lib.open_workdir(wd, step=5)
    _damage(wd, 3)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"step 5 in .*unreadable .*; no usable checkpoint .*step 3: "):
        workdir_lib.open_workdir(wd)


def test_params_only_checkpoint_evaluates_as_the_full_state(clip_wd, tmp_path):
    """A params-only checkpoint (what `mmjax convert` writes) read onto an eval run's
    mesh gives the metrics of the full state: the path `mmjax eval` takes."""
    wd = str(tmp_path / "params_only")
    os.makedirs(wd)
    for name in ("config.json", "tokenizer.model"):
        shutil.copyfile(os.path.join(clip_wd, name), os.path.join(wd, name))
    full = workdir_lib.open_workdir(clip_wd)
    workdir_lib.save_params(wd, jax.device_put(full.params, jax.local_devices()[0]), step=5, meta={"source": "test"})
    assert manifest_lib.verify_files(os.path.join(wd, "checkpoints", "5")) is None  # sealed with a manifest
    config = workdir_lib.load_config_json(wd)
    with config.unlocked():
        config.eval.max_examples = 32
    setup = setup_lib.Setup(config, wd)
    setup.checkpointer.close()
    params, step = workdir_lib.read_params(wd, sharding=setup.state_sharding.params)
    evaluator = setup.evaluator()
    got = evaluator(params)
    want = evaluator(jax.device_put(full.params, setup.state_sharding.params))
    assert step == 5 and got and got == want


def test_open_workdir_imports_no_tensorflow_and_no_train(clip_wd):
    """Opening a workdir, its family and tokenizer: no TensorFlow (accelerator images
    often lack it) and nothing of mmjax.train."""
    code = (
        "import sys\n"
        "from mmjax import workdir\n"
        f"w = workdir.open_workdir({clip_wd!r})\n"
        "w.family, w.tokenizer.encode(['a red circle'], 8)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')"
        " or m.startswith('mmjax.train'))\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def test_converted_workdir_finetunes(data_dir, tmp_path, capsys):
    """`mmjax convert` then `mmjax finetune --init-from` the converted workdir: the linear
    probe's frozen backbone is bit for bit the imported CLIP's image tower."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mmjax import cli
    from mmjax.export import hf, hf_parity, hf_workdir

    src = str(tmp_path / "hf")
    hf_parity.random_hf_clip(hf_parity.PARITY_CONFIGS["quickgelu-argmax"], seed=1).save_pretrained(src)
    wd, ft = str(tmp_path / "converted"), str(tmp_path / "ft")
    hf_workdir.convert_to_workdir(src, wd)
    _, imported = hf.read_clip(src)
    opened = workdir_lib.open_workdir(wd)
    _assert_bits_equal(opened.params, imported)
    meta = manifest_lib.read_manifest(os.path.join(wd, "checkpoints", "0"))["shapes"]
    assert meta and all(k.startswith("['params']") for k in meta)  # params only: no optimizer state
    over = {k: v for k, v in tiny_overrides(data_dir).items() if not k.startswith("model.")}
    over.update({"train.steps": 2, "train.log_every": 1, "train.ckpt_every": 0, "eval.at_end": False})
    argv = ["finetune", "--config", f"{ROOT}/configs/finetune_shapes.py:linear", "--init-from", wd]
    argv += ["--workdir", ft, "--no-progress", *[f"--config.{k}={v}" for k, v in over.items()]]
    assert cli.main(argv) == 0, capsys.readouterr().err
    tuned = workdir_lib.open_workdir(ft)
    assert tuned.step == 2
    _assert_bits_equal(tuned.params["backbone"]["image_tower"], imported["image_tower"])
    # the converted workdir starts fine-tuning runs; resuming it as a training run is one clear error
    capsys.readouterr()
    assert workdir_lib.params_only_step(wd) == 0 and workdir_lib.params_only_step(ft) is None
    assert cli.main(["train", "--config", f"{ROOT}/configs/demo.py", "--workdir", wd, "--no-progress"]) == 2
    assert "holds params alone (as `mmjax convert` writes)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- imports


def _import_graph():
    """{module: {mmjax modules it imports, at the top or inside a function}} of the package."""
    pkg = os.path.join(ROOT, "mmjax")
    mods = {}
    for dirpath, _, names in os.walk(pkg):
        for n in names:
            if n.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, n), ROOT)[:-3].replace(os.sep, ".")
                mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, n)

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                edges |= {resolve(a.name) for a in node.names if a.name.startswith("mmjax")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmjax") and not node.level:
                edges |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        graph[mod] = edges - {None, mod}
    return graph


def _cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_and_no_train_below_train():
    """No two modules of the package import each other, directly or around a circle,
    counting the imports inside functions; eval, export, checkpoint, the workdir layer
    and the API import nothing of mmjax.train."""
    graph = _import_graph()
    # imports at the top and inside functions both count
    assert len(graph) > 50 and {"mmjax.checkpoint", "mmjax.models.zoo"} <= graph["mmjax.workdir"]
    circles = {" <-> ".join(c): {m: sorted(set(graph[m]) & set(c)) for m in c} for c in _cycles(graph)}
    assert circles == {}, f"import circles (module: what it imports of the circle): {circles}"
    below = [m for m in graph if m.startswith(("mmjax.eval", "mmjax.export", "mmjax.checkpoint", "mmjax.workdir"))]
    below += ["mmjax.api"]
    bad = {m: sorted(t for t in graph[m] if t.startswith("mmjax.train")) for m in below}
    assert {m: t for m, t in bad.items() if t} == {}
    # the check itself sees a circle and a train import when there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
