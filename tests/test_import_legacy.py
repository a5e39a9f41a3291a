"""``packnet import`` of official PackNet checkpoints as PyTorch 0.2 on Python 2.7 wrote them.

The files are emitted opcode by opcode (``tests/legacy_pickle.py``), in the module layouts
the official ``src/networks.py`` built from torchvision 0.2: ``ModifiedVGG16`` (VGG-16's
features, ``View(-1, 25088)``, fc6 and fc7 in ``shared``), ``ModifiedResNet`` (ResNet-50's
children but ``fc``), ``ModifiedDenseNet`` (DenseNet-121's ``features``, layers named
``norm.1``/``conv.2``), every tensor on ``cuda:0``, with the checkpoint dict of
``Manager.save_model``: ``args``, ``epoch``, ``accuracy`` and ``errors`` (numpy floats, as
torchnet's meter gave them), ``dataset2idx``, ``previous_masks`` keyed by position in
``model.shared.modules()``, ``model`` and, with ``--train_biases``, ``dataset2biases``.
The networks are full size (the importer checks them against torchvision's shapes).

Each task's logits after the import are compared with what the official ``Manager.eval``
computes from the same tensors: weights whose mask is 0 or above the dataset's index
zeroed, the dataset's biases, its classifier.
"""

from __future__ import annotations

import json

import pytest
import torch
from legacy_pickle import (
    Global,
    Instance,
    Module,
    avg_pool,
    batch_norm,
    conv,
    dropout,
    legacy_save,
    linear,
    max_pool,
    numpy_float64,
    relu,
    sequential,
    tensor_of,
)
from packnet_export.cli.main import app
from typer.testing import CliRunner

from packnet_export import checkpoint, models
from packnet_export.errors import PackNetError
from packnet_export.importers import import_file
from packnet_export.importers.safe_pickle import torch_load


@pytest.fixture(autouse=True)
def one_thread():
    """Full-size networks on a shared two-core machine: one thread each is faster than two fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DATASETS = [("imagenet", 1000), ("cubs", 5), ("cars", 4)]
HEAD = {"vgg16": "classifier.6", "resnet50": "fc", "densenet121": "classifier"}


def random_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """torchvision's state dict of ``arch``: scaled random weights, trained-looking batch norm."""
    with torch.device("meta"):
        skeleton = models.build(arch, 1000)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in skeleton.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(meta.shape, generator=g)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = 0.1 * torch.randn(meta.shape, generator=g)
        elif meta.dim() == 1:  # batch-norm scale
            state[key] = 1 + 0.1 * torch.randn(meta.shape, generator=g)
        else:
            fan_in = meta[0].numel()
            state[key] = torch.randn(meta.shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def _bn(state, prefix):
    return batch_norm(*(state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")))


def _conv(state, prefix, stride=1, padding=0):
    module = conv(state[f"{prefix}.weight"], state.get(f"{prefix}.bias"), stride, padding)
    module.origin = prefix
    return module


def _linear(state, prefix):
    module = linear(state[f"{prefix}.weight"], state[f"{prefix}.bias"])
    module.origin = prefix
    return module


def official_vgg16(state):
    """``shared``: VGG-16's features, View, fc6, ReLU, Dropout, fc7, ReLU, Dropout (networks.py)."""
    children = []
    for i in range(31):
        if f"features.{i}.weight" in state:
            children.append(_conv(state, f"features.{i}", padding=1))
        elif i in (4, 9, 16, 23, 30):
            children.append(max_pool(2, 2))
        else:
            children.append(relu())
    view = Module("networks.View", {"shape": (-1, 25088)})
    children += [view, _linear(state, "classifier.0"), relu(), dropout(), _linear(state, "classifier.3"), relu(),
                 dropout()]
    return sequential([(str(i), m) for i, m in enumerate(children)])


def _bottleneck(state, prefix, stride):
    modules = [("conv1", _conv(state, f"{prefix}.conv1")), ("bn1", _bn(state, f"{prefix}.bn1")),
               ("conv2", _conv(state, f"{prefix}.conv2", stride, 1)), ("bn2", _bn(state, f"{prefix}.bn2")),
               ("conv3", _conv(state, f"{prefix}.conv3")), ("bn3", _bn(state, f"{prefix}.bn3")), ("relu", relu())]
    attributes = {"stride": stride}
    if f"{prefix}.downsample.0.weight" in state:
        modules.append(("downsample", sequential([("0", _conv(state, f"{prefix}.downsample.0", stride)),
                                                  ("1", _bn(state, f"{prefix}.downsample.1"))])))
    else:
        attributes["downsample"] = None  # 0.2: a None attribute, not a registered module
    return Module("torchvision.models.resnet.Bottleneck", attributes, modules=modules)


def official_resnet50(state):
    """``shared``: ResNet-50's children but ``fc``, added one by one (networks.py)."""
    children = [("conv1", _conv(state, "conv1", 2, 3)), ("bn1", _bn(state, "bn1")), ("relu", relu()),
                ("maxpool", max_pool(3, 2, 1))]
    for layer in range(1, 5):
        blocks = []
        while f"layer{layer}.{len(blocks)}.conv1.weight" in state:
            j = len(blocks)
            blocks.append((str(j), _bottleneck(state, f"layer{layer}.{j}", 2 if j == 0 and layer > 1 else 1)))
        children.append((f"layer{layer}", sequential(blocks)))
    children.append(("avgpool", avg_pool(7, 1)))
    return sequential(children)


def official_densenet121(state):
    """``shared``: DenseNet-121's ``features`` as torchvision 0.2 named them ("norm.1", "conv.2")."""
    dn = "torchvision.models.densenet"
    children = [("conv0", _conv(state, "features.conv0", 2, 3)), ("norm0", _bn(state, "features.norm0")),
                ("relu0", relu()), ("pool0", max_pool(3, 2, 1))]
    for block in range(1, 5):
        layers = []
        while f"features.denseblock{block}.denselayer{len(layers) + 1}.conv1.weight" in state:
            p = f"features.denseblock{block}.denselayer{len(layers) + 1}"
            layer = sequential([("norm.1", _bn(state, f"{p}.norm1")), ("relu.1", relu()),
                                ("conv.1", _conv(state, f"{p}.conv1")), ("norm.2", _bn(state, f"{p}.norm2")),
                                ("relu.2", relu()), ("conv.2", _conv(state, f"{p}.conv2", 1, 1))], f"{dn}._DenseLayer")
            layer.attributes["drop_rate"] = 0
            layers.append((f"denselayer{len(layers) + 1}", layer))
        children.append((f"denseblock{block}", sequential(layers, f"{dn}._DenseBlock")))
        if block < 4:
            p = f"features.transition{block}"
            children.append((f"transition{block}", sequential(
                [("norm", _bn(state, f"{p}.norm")), ("relu", relu()), ("conv", _conv(state, f"{p}.conv")),
                 ("pool", avg_pool(2, 2))], f"{dn}._Transition")))
    children.append(("norm5", _bn(state, "features.norm5")))
    return sequential(children)


OFFICIAL = {"vgg16": ("networks.ModifiedVGG16", official_vgg16),
            "resnet50": ("networks.ModifiedResNet", official_resnet50),
            "densenet121": ("networks.ModifiedDenseNet", official_densenet121)}


def official_checkpoint(arch: str, train_biases: bool, seed: int = 0):
    """(file bytes, torchvision state, heads, masks by torchvision key, biases by dataset):
    what three official runs (imagenet 1, cubs 2, cars 3) leave in cars' ``_final.pt``."""
    state = random_state(arch, seed)
    g = torch.Generator().manual_seed(seed + 100)
    head = HEAD[arch]
    width = state[f"{head}.weight"].shape[1]
    heads = {"imagenet": (state.pop(f"{head}.weight"), state.pop(f"{head}.bias"))}
    for name, n in DATASETS[1:]:
        heads[name] = (0.05 * torch.randn(n, width, generator=g), 0.05 * torch.randn(n, generator=g))
    prunable = [k for k, v in state.items() if k.endswith(".weight") and v.dim() > 1]
    masks = {k: torch.randint(0, 4, state[k].shape, generator=g, dtype=torch.uint8) for k in prunable}
    for k in prunable:
        state[k][masks[k] == 0] = 0.0  # the official pruning leaves pruned weights at zero
    bias_keys = [k[: -len("weight")] + "bias" for k in prunable if k[: -len("weight")] + "bias" in state]
    biases = {name: {k: state[k] + 0.05 * torch.randn(state[k].shape, generator=g) for k in bias_keys}
              for name, _ in DATASETS}

    cls, build = OFFICIAL[arch]
    shared = build(state)
    positions, bias_positions = {}, {}  # position in shared.modules() -> torchvision key
    for index, module in enumerate(shared.walk()):
        if module.cls.endswith(("Conv2d", "Linear")):
            positions[index] = f"{module.origin}.weight"
            if dict(module.parameters).get("bias") is not None:
                bias_positions[index] = f"{module.origin}.bias"
    assert sorted(positions.values()) == sorted(prunable)
    classifiers = [linear(*heads[name]) for name, _ in DATASETS]
    model = Module(cls, {"datasets": [name for name, _ in DATASETS]},
                   modules=[("classifiers", sequential([(str(i), c) for i, c in enumerate(classifiers)],
                                                       "torch.nn.modules.container.ModuleList")),
                            ("shared", shared), ("classifier", classifiers[-1])])
    args = Instance(Global("argparse", "Namespace"), {
        "arch": {"vgg16": "vgg16", "resnet50": "resnet50", "densenet121": "densenet121"}[arch], "mode": "prune",
        "dataset": "cars", "train_path": "../data/stanford_cars_cropped/train", "lr": 0.001, "lr_decay_every": 10,
        "batch_size": 32, "prune_perc_per_layer": 0.75, "post_prune_epochs": 10, "train_biases": train_biases,
        "train_bn": False, "cuda": True, "loadname": "../checkpoints/cubs/final.pt", "num_outputs": 4})
    ckpt = {"args": args, "epoch": 10, "accuracy": numpy_float64(91.25),
            "errors": [numpy_float64(8.75), numpy_float64(1.5)],
            "dataset2idx": {name: i for i, (name, _) in enumerate(DATASETS, start=1)},
            "previous_masks": {i: tensor_of(masks[k]) for i, k in positions.items()}, "model": model}
    if train_biases:
        ckpt["dataset2biases"] = {name: {i: tensor_of(biases[name][k]) for i, k in bias_positions.items()}
                                  for name, _ in DATASETS}
    return legacy_save(ckpt), state, heads, masks, (biases if train_biases else None)


def official_logits(arch, state, heads, masks, biases, x) -> dict[str, torch.Tensor]:
    """``Manager.eval`` of each dataset, through torchvision's module run on the given tensors."""
    with torch.device("meta"):
        skeleton = models.build(arch, 10).eval()
    buffers = {k: torch.zeros((), dtype=torch.long) for k in skeleton.state_dict() if k.endswith("num_batches_tracked")}
    out = {}
    with torch.no_grad():
        for k, (name, _) in enumerate(DATASETS, start=1):
            task = dict(state)
            for key, mask in masks.items():
                task[key] = torch.where((mask == 0) | (mask > k), torch.zeros(()), state[key])
            if biases is not None:
                task.update(biases[name])
            w, b = heads[name]
            task.update({f"{HEAD[arch]}.weight": w, f"{HEAD[arch]}.bias": b}, **buffers)
            out[name] = torch.func.functional_call(skeleton, task, (x,))
    return out


def assert_same_logits(model, expected, x) -> None:
    with torch.device("meta"):
        skeleton = models.build(model.arch, 10).eval()
    with torch.no_grad():
        for name, ref in expected.items():
            got = torch.func.functional_call(skeleton, model.task_state_dict(model.task_number(name)), (x,))
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())),
                                       msg=f"task {name}")


@pytest.mark.parametrize("arch,train_biases,size", [
    ("densenet121", True, 32),
    ("resnet50", False, 32),
    pytest.param("vgg16", True, 32, marks=pytest.mark.slow),
])
def test_pytorch_02_python_27_checkpoint_imports(arch, train_biases, size, tmp_path):
    blob, state, heads, masks, biases = official_checkpoint(arch, train_biases)
    source = tmp_path / "final.pt"
    source.write_bytes(blob)
    assert blob[:2] == b"\x80\x02" and b"_get_thnn_function_backend" in blob and b"cuda:0" in blob
    assert b"num_batches_tracked" not in blob and b"_forward_pre_hooks" not in blob
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(7))
    expected = official_logits(arch, state, heads, masks, biases, x)

    out = tmp_path / "imported.safetensors"
    result = CliRunner().invoke(app, ["import", str(source), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["arch"] == arch and summary["source"] == "official"
    assert [(t["name"], t["classes"]) for t in summary["tasks"]] == DATASETS
    model = checkpoint.load(out)
    assert model.per_task_norm == (biases is not None and bool(next(iter(biases.values()))))
    for key, mask in masks.items():
        assert torch.equal(model.owners[key], mask), key
    assert model.tasks[2].metrics == {"test_top1": 91.25, "test_top5": 98.5}
    assert model.tasks[2].training["args"]["loadname"] == "../checkpoints/cubs/final.pt"
    assert_same_logits(model, expected, x)


def test_legacy_pickle_reads_back_as_the_official_objects():
    """The unpickled tree is the official one: inert stand-ins, the 0.2 backend as a marker,
    Parameters rebuilt the Variable way, CUDA storages on the CPU."""
    import tempfile

    blob, state, heads, masks, _ = official_checkpoint("densenet121", train_biases=False, seed=3)
    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        f.write(blob)
        f.flush()
        ckpt = torch_load(f.name)
    net = ckpt["model"]
    assert net.source_class == "networks.ModifiedDenseNet" and net.datasets == ["imagenet", "cubs", "cars"]
    layer = net.children["shared"].children["denseblock1"].children["denselayer1"]
    assert layer.source_class == "torchvision.models.densenet._DenseLayer"
    assert list(layer.children) == ["norm.1", "relu.1", "conv.1", "norm.2", "relu.2", "conv.2"]
    norm = layer.children["norm.1"]
    assert repr(norm._backend) == "<inert torch.nn.backends.thnn backend>"
    assert set(norm.buffers) == {"running_mean", "running_var"}
    weight = layer.children["conv.1"].parameters["weight"]
    assert isinstance(weight, torch.nn.Parameter) and weight.device.type == "cpu" and weight.requires_grad
    assert torch.equal(weight.detach(), state["features.denseblock1.denselayer1.conv1.weight"])
    assert net.children["classifier"] is net.children["classifiers"].children["2"]
    assert type(ckpt["accuracy"]).__name__ == "float64" and float(ckpt["accuracy"]) == 91.25
    assert vars(ckpt["args"])["dataset"] == "cars"


@pytest.mark.parametrize("name", ["posix.system", "os.system", "builtins.eval", "torch.nn.backends.thnn.backend",
                                  "torch.nn.backends.thnn.THNNFunctionBackend", "subprocess.Popen"])
def test_only_the_backend_call_is_allowed_in_legacy_files(name, tmp_path):
    """The 0.2 backend's rebuilder maps to an inert marker; its neighbours stay refused."""
    from legacy_pickle import Py2Pickler, Reduce

    module, _, attr = name.rpartition(".")
    blob = Py2Pickler({}, set()).dump({"model": Reduce(Global(module, attr), ("touch /tmp/x",)),
                                       "previous_masks": {}, "dataset2idx": {}})
    source = tmp_path / "evil.pt"
    source.write_bytes(blob)
    with pytest.raises(PackNetError, match=f"refusing to load {name.replace('.', '[.]')}"):
        import_file(source)
