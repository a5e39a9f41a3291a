"""Backbones beyond vgg_mini: every torchvision model by name, the head found from the model, the
prunable-vs-norm/bias rule per layer kind, users' own networks, and the edge networks end to end.

Each edge architecture runs the whole PackNet cycle once per module on a few synthetic images at
its smallest practical size: init, two tasks (the first bit-identical after the second), dense,
sparse and multitask exports compared with PyTorch under onnxruntime, and the storage report.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import make_image_folder
from packnet_export.cli.main import app
from torch import nn
from typer.testing import CliRunner

from packnet_export import checkpoint, masks, models, storage
from packnet_export.checkpoint import PackNet
from packnet_export.errors import PackNetError
from packnet_export.exporter import validation
from packnet_export.exporter.pipeline import export
from packnet_export.training import TrainConfig, add_task

QUICK = dict(epochs=1, finetune_epochs=0, lr=0.001, finetune_lr=0.001, batch_size=8, val_fraction=0.0)
"""One epoch of 8-image batches. At 32 px these networks end in 1x1 feature maps, where batch norm
normalizes each channel over one value per image; over 3 images its gradients blow up (efficientnet_b0's
first convolution grew from 0.26 to 6,622 in 3 steps at lr 0.001, and evaluation overflowed), over 8 the
weights stay in range (0.26 to 1.6)."""

# arch -> (image size for the tests, head path torchvision's model has)
EDGE = {
    "mobilenet_v2": (32, "classifier.1"),
    "mobilenet_v3_small": (32, "classifier.3"),
    "mobilenet_v3_large": (32, "classifier.3"),
    "efficientnet_b0": (32, "classifier.1"),
    "shufflenet_v2_x1_0": (32, "fc"),
    "squeezenet1_1": (32, "classifier.1"),
    "regnet_y_400mf": (32, "fc"),
    "convnext_tiny": (32, "classifier.2"),
}
TODAY = {"vgg_mini": "fc", "vgg16": "classifier.6", "vgg16_bn": "classifier.6", "resnet18": "fc",
         "resnet50": "fc", "densenet121": "classifier"}


@pytest.mark.parametrize("arch,head", [*((a, h) for a, (_, h) in EDGE.items()), *TODAY.items()])
def test_the_head_is_found_from_the_model(arch, head):
    assert models.head_path(arch) == head
    assert models.get_arch(arch).source == ("packnet" if arch == "vgg_mini" else "torchvision")


def test_squeezenets_head_is_its_final_1x1_convolution():
    layer = models.build_meta("squeezenet1_1", 5).get_submodule(models.head_path("squeezenet1_1"))
    assert isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.out_channels == 5


def test_auxiliary_heads_are_off_by_default_and_asking_for_them_is_refused():
    assert models.head_path("googlenet") == "fc"
    with pytest.raises(PackNetError, match="ambiguous.*aux1.fc2"):
        models.check_arch_kwargs("googlenet", {"aux_logits": True})


def test_unknown_architecture_suggests_and_says_how_to_list_and_register():
    with pytest.raises(PackNetError) as exc:
        models.get_arch("mobilenet_v3_smal")
    msg = str(exc.value)
    assert "did you mean 'mobilenet_v3_small'" in msg and "--list-archs" in msg and "register_builder" in msg


# ----------------------------------------------------------------- prunable vs norm/bias
def _roles(arch: str) -> dict[str, dict]:
    return {r["key"]: r for r in models.layer_kinds(arch)}


def test_depthwise_and_squeeze_excitation_convolutions_are_prunable():
    roles = _roles("mobilenet_v3_small")
    depthwise = [r for r in roles.values() if "depthwise" in r["module"]]
    assert depthwise and all(r["role"] == "prunable" and r["shape"][1] == 1 for r in depthwise)
    se = [k for k in roles if ".fc1." in k or ".fc2." in k]  # SqueezeExcitation's two 1x1 convolutions
    assert {roles[k]["role"] for k in se if k.endswith(".weight")} == {"prunable"}
    assert {roles[k]["role"] for k in se if k.endswith(".bias")} == {"norm/bias"}
    assert roles["classifier.0.weight"]["role"] == "prunable"  # a Linear before the head
    assert roles["classifier.0.bias"]["role"] == "norm/bias"
    assert roles["classifier.3.weight"]["role"] == "head"


def test_grouped_convolutions_are_prunable():
    roles = _roles("regnet_y_400mf")
    grouped = [r for r in roles.values() if "groups=" in r["module"]]
    assert grouped and all(r["role"] == "prunable" for r in grouped)


def test_layer_norm_and_layer_scale_are_norm_bias_and_block_linears_prunable():
    roles = _roles("convnext_tiny")
    block = "features.1.0"
    assert roles[f"{block}.layer_scale"]["role"] == "norm/bias"
    assert roles[f"{block}.block.2.weight"]["module"] == "LayerNorm"
    assert roles[f"{block}.block.2.weight"]["role"] == roles[f"{block}.block.2.bias"]["role"] == "norm/bias"
    assert roles[f"{block}.block.3.weight"]["role"] == "prunable"  # the MLP's Linear layers
    assert roles[f"{block}.block.3.bias"]["role"] == "norm/bias"
    assert roles[f"{block}.block.0.weight"]["module"].startswith("Conv2d (depthwise)")


def test_attention_projections_are_prunable():
    import functools

    from torchvision.models.vision_transformer import VisionTransformer

    tiny_vit = functools.partial(VisionTransformer, image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                 hidden_dim=8, mlp_dim=16)
    models.register_builder("test_vit_roles", tiny_vit)
    try:
        assert models.head_path("test_vit_roles") == "heads.head"
        prunable, norm_bias, _ = models.split_state_keys(tiny_vit(num_classes=3), "test_vit_roles")
    finally:
        models.unregister("test_vit_roles")
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in prunable
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj.weight" in prunable
    assert {"class_token", "encoder.pos_embedding"} <= set(norm_bias)


# ----------------------------------------------------------------- input size
def test_minimum_input_size_by_shape_inference_matches_torchvisions_own():
    import torchvision

    for arch in ("squeezenet1_1", "vgg16", "mobilenet_v3_small", "convnext_tiny"):
        documented = torchvision.models.get_model_weights(arch).DEFAULT.meta["min_size"][0]
        assert models.min_image_size(arch) == documented, arch
    assert models.min_image_size("vgg_mini", {"width": 4}) == 16


def test_an_input_too_small_is_refused_with_the_minimum():
    models.check_image_size("squeezenet1_1", 17)
    with pytest.raises(PackNetError, match="image_size must be at least 17 for squeezenet1_1"):
        models.check_image_size("squeezenet1_1", 16)


def test_regnet_is_laid_out_without_memory():
    """regnet computes its widths with torch ops; the meta build must still work (load checks use it)."""
    module = models.build_meta("regnet_y_128gf", 10)
    assert sum(p.numel() for p in module.parameters()) > 600_000_000
    assert all(p.is_meta for p in module.parameters())


@pytest.mark.slow
def test_every_torchvision_classification_model_resolves_a_head():
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        if name == "maxvit_t":  # its classifier has no bias: refused, with the reason
            with pytest.raises(PackNetError, match="maxvit_t: its head classifier.5 has no bias"):
                models.head_path(name)
            continue
        head = models.build_meta(name, 7).get_submodule(models.head_path(name))
        assert head.weight.shape[0] == 7, name


# ----------------------------------------------------------------- edge networks end to end
class Cycle:
    """One architecture through the whole PackNet cycle, shared by the tests of that architecture."""

    def __init__(self, arch: str, size: int, root, arch_kwargs: dict | None = None) -> None:
        self.arch, self.size = arch, size
        data = {n: make_image_folder(root / n, classes=c, per_class=8, test_per_class=1, size=size, seed=i)
                for i, (n, c) in enumerate((("first", 3), ("second", 2)))}
        self.x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        model = PackNet.create(arch, size, arch_kwargs)
        self.one = add_task(model, "first", data["first"], TrainConfig(**QUICK))
        self.two = add_task(self.one, "second", data["second"], TrainConfig(**{**QUICK, "prune": 0.0}))
        self.out = root / "exports"

    def exported(self, formats: list[str], tasks: list[int] | None = None) -> list:
        return export(self.two, self.out, tasks or list(range(1, len(self.two.tasks) + 1)), formats, force=True)


def _logits(model: PackNet, task: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.task_module(task)(x)


def _check_exports(c: Cycle, formats: list[str], tasks: list[int] | None = None) -> None:
    """Every file of ``formats`` computes what PyTorch computes; no random op is left."""
    files = c.exported(formats, tasks)
    assert {f.format for f in files} == set(formats)
    for f in files:
        result = validation.validate_file(f.path, c.two, measure_latency=False)
        assert result["passed"], (f.path.name, result)
        ops = {n.op_type for n in onnx.load(str(f.path), load_external_data=False).graph.node}
        assert not ops & {"Dropout", "RandomUniform", "RandomUniformLike", "Bernoulli"}, ops


@pytest.fixture(scope="module")
def cycles(tmp_path_factory):
    made: dict[str, Cycle] = {}

    def get(arch: str) -> Cycle:
        if arch not in made:
            made[arch] = Cycle(arch, EDGE[arch][0], tmp_path_factory.mktemp(arch))
        return made[arch]

    return get


HEAVY = "convnext_tiny"
"""28 M weights: its cycle costs as much as the rest together. Its exports beyond task 1's dense file are
``slow``; the cycle is built once (``cycles``) for all of its tests."""


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == HEAVY else a for a in EDGE])
def test_edge_network_two_tasks_without_forgetting_dense_export_and_report(arch, cycles):
    c = cycles(arch)
    # zero forgetting: task 1's logits bit-identical after task 2 was added
    assert torch.equal(_logits(c.one, 1, c.x), _logits(c.two, 1, c.x))
    # evaluation is deterministic: dropout and stochastic depth are off
    assert torch.equal(_logits(c.two, 2, c.x), _logits(c.two, 2, c.x))
    used = [int(masks.uses(o, 1).sum()) for o in c.two.owners.values()]
    assert 0 < sum(used) < sum(o.numel() for o in c.two.owners.values())  # task 1 was pruned
    _check_exports(c, ["dense"], [2])  # task 1's file is task 1's unchanged logits, checked above
    cost = storage.build_report(storage.inventory_from_model(c.two))["storage"]
    assert cost["packnet_paper"]["bits"] < cost["separate"]["bits"]


def test_heavy_edge_network_trains_and_exports_its_first_task_dense(cycles):
    c = cycles(HEAVY)
    assert 0 < sum(int(masks.uses(o, 1).sum()) for o in c.one.owners.values())
    _check_exports(c, ["dense"], [1])


def test_a_task_whose_evaluation_overflows_is_refused_and_nothing_is_written(tmp_path):
    """3-image batches at efficientnet_b0's 1x1 feature maps: the training loss stays finite (each
    batch's statistics absorb the weights' growth) while evaluation, on the running statistics,
    computes NaN, and every later task would diverge at its first step."""
    data = make_image_folder(tmp_path / "d", classes=3, per_class=3, test_per_class=1, size=32)
    ckpt = tmp_path / "m.safetensors"
    checkpoint.save(PackNet.create("efficientnet_b0", 32), ckpt)
    before = ckpt.read_bytes()
    r = CliRunner().invoke(app, ["add-task", str(ckpt), "--name", "first", "--data", str(data), "--epochs", "1",
                                 "--finetune-epochs", "0", "--lr", "0.001", "--batch-size", "3", "--val-fraction", "0"])
    assert r.exit_code == 2, r.output
    assert "training diverged: task 'first' computes nan in evaluation mode" in r.output
    assert "Raise --batch-size" in r.output
    assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["d", "m.safetensors"]


@pytest.mark.parametrize("arch", [
    "mobilenet_v3_small", "squeezenet1_1",
    *(pytest.param(a, marks=pytest.mark.slow) for a in EDGE if a not in ("mobilenet_v3_small", "squeezenet1_1")),
])
def test_edge_network_sparse_and_multitask_exports(arch, cycles):
    _check_exports(cycles(arch), ["sparse", "multitask"])


def test_runtime_mask_multitask_of_a_conv_head_pads_with_minus_inf(cycles, tmp_path):
    """squeezenet's head feeds ReLU and pooling: the padded columns must still read -inf."""
    c = cycles("squeezenet1_1")
    (f,) = export(c.two, tmp_path, [1, 2], ["multitask"], layout="runtime-mask")
    session = validation.make_session(f.path, "cpu").session
    logits, count = session.run(None, {"input": c.x.numpy(), "task_index": np.array(1, dtype=np.int64)})
    assert int(count) == 2 and np.isneginf(logits[:, 2:]).all()
    np.testing.assert_allclose(logits[:, :2], _logits(c.two, 2, c.x).numpy(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- users' own networks
def small_net(num_classes: int = 10, width: int = 4) -> nn.Module:
    """A user's network: depthwise-separable block, a Linear inside, a Linear head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width), nn.Conv2d(width, 2 * width, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 8), nn.ReLU(), nn.Linear(8, num_classes),
    )


@pytest.fixture
def registered():
    models.register_builder("small_net", small_net, default_image_size=16)
    yield "small_net"
    if "small_net" in models.ARCHITECTURES:
        models.unregister("small_net")


def test_a_registered_network_trains_exports_and_reloads_by_name(registered, tmp_path):
    assert models.head_path("small_net") == "10"
    data = make_image_folder(tmp_path / "d", classes=3, per_class=4, test_per_class=1, size=16)
    model = add_task(PackNet.create("small_net", arch_kwargs={"width": 6}), "t", data, TrainConfig(**QUICK))
    path = tmp_path / "m.safetensors"
    checkpoint.save(model, path)
    meta = json.loads(checkpoint.safe_open(str(path), "pt").metadata()["packnet"])
    assert meta["arch"] == "small_net" and meta["arch_kwargs"] == {"width": 6} and meta["image_size"] == 16
    loaded = checkpoint.load(path)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_logits(loaded, 1, x), _logits(model, 1, x))
    (f,) = export(loaded, tmp_path / "out", [1], ["sparse"])
    assert validation.validate_file(f.path, loaded, measure_latency=False)["passed"]

    models.unregister("small_net")
    with pytest.raises(PackNetError) as exc:
        checkpoint.load(path)
    msg = str(exc.value)
    assert "not registered" in msg and "register_builder('small_net', builder)" in msg and '"width": 6' in msg


def test_an_ambiguous_head_asks_for_the_path_which_then_works():
    def two_heads(num_classes: int = 10) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(48, num_classes), nn.Linear(num_classes, num_classes))

    models.register_builder("two_heads", two_heads)
    try:
        with pytest.raises(PackNetError, match="ambiguous.*head='path.to.layer'"):
            models.head_path("two_heads")
        models.register_builder("two_heads", two_heads, head="2", replace=True)
        assert models.head_keys("two_heads") == ("2.weight", "2.bias")
        prunable, _, _ = models.split_state_keys(two_heads(), "two_heads")
        assert prunable == ["1.weight"]
    finally:
        models.unregister("two_heads")


def test_unusable_heads_and_arguments_are_clear_errors(registered):
    def no_bias(num_classes: int = 10) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(48, num_classes, bias=False))

    models.register_builder("no_bias", no_bias)
    try:
        with pytest.raises(PackNetError, match="has no bias"):
            models.head_path("no_bias")
    finally:
        models.unregister("no_bias")
    with pytest.raises(PackNetError, match="must be JSON values"):
        PackNet.create("small_net", arch_kwargs={"width": object()})
    with pytest.raises(PackNetError, match="must not set num_classes"):
        PackNet.create("small_net", arch_kwargs={"num_classes": 3})
    with pytest.raises(PackNetError, match="is a torchvision model"):
        models.register_builder("resnet18", small_net)


def test_an_installed_package_can_declare_architectures_for_the_cli(monkeypatch, tmp_path):
    from importlib.metadata import EntryPoint

    ep = EntryPoint("plugin_mini", "packnet_export.models:VGGMini", models.ENTRY_POINT_GROUP)
    monkeypatch.setattr(models, "_entry_points", lambda: {"plugin_mini": ep})
    models._head_of.cache_clear()
    ckpt = tmp_path / "m.safetensors"
    r = CliRunner().invoke(app, ["init", "--arch", "plugin_mini", "--arch-kwargs", '{"width": 4}',
                                 "--image-size", "16", "-o", str(ckpt)])
    assert r.exit_code == 0, r.output
    assert checkpoint.load(ckpt).arch == "plugin_mini"
    models._head_of.cache_clear()


def test_timm_models_by_name(tmp_path):
    pytest.importorskip("timm")
    data = make_image_folder(tmp_path / "d", classes=2, per_class=3, test_per_class=1, size=32)
    model = add_task(PackNet.create("timm/test_efficientnet", 32), "t", data, TrainConfig(**QUICK))
    (f,) = export(model, tmp_path / "out", [1], ["dense"])
    assert validation.validate_file(f.path, model, measure_latency=False)["passed"]


# ----------------------------------------------------------------- the command line
def test_init_help_says_how_to_list_and_the_list_has_every_torchvision_model():
    import torchvision

    runner = CliRunner()
    assert "--list-archs" in runner.invoke(app, ["init", "--help"]).output
    r = runner.invoke(app, ["init", "--list-archs", "--json"])
    assert r.exit_code == 0, r.output
    names = {a["name"] for a in json.loads(r.output)}
    assert {"vgg_mini", *torchvision.models.list_models(module=torchvision.models)} <= names
    r = runner.invoke(app, ["init"])
    assert r.exit_code == 2 and "--list-archs" in r.output


def test_init_with_arch_kwargs_and_bad_json(tmp_path):
    runner = CliRunner()
    ckpt = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["init", "--arch", "mobilenet_v2", "--arch-kwargs", '{"width_mult": 0.25}',
                            "--image-size", "32", "-o", str(ckpt), "--json"])
    assert r.exit_code == 0, r.output
    model = checkpoint.load(ckpt)
    assert model.arch_kwargs == {"width_mult": 0.25}
    assert model.shared["features.1.conv.0.0.weight"].shape[0] == 8  # 32 channels x 0.25
    r = runner.invoke(app, ["init", "--arch", "mobilenet_v2", "--arch-kwargs", "{width", "-o", str(ckpt), "--force"])
    assert r.exit_code == 2 and "not JSON" in r.output


def test_init_from_a_local_imagenet_state_dict_keeps_its_head(tmp_path):
    """--weights with an ImageNet-shaped file of an edge network: its 1000-class head serves task 1."""
    import torchvision

    torch.manual_seed(0)
    source = torchvision.models.mobilenet_v3_small().eval()
    weights = tmp_path / "mobilenet_v3_small.pth"
    torch.save(source.state_dict(), weights)
    ckpt = tmp_path / "m.safetensors"
    r = CliRunner().invoke(app, ["init", "--arch", "mobilenet_v3_small", "--weights", str(weights),
                                 "--image-size", "32", "-o", str(ckpt)])
    assert r.exit_code == 0, r.output
    model = checkpoint.load(ckpt)
    expected = source.state_dict()
    assert torch.equal(model.pretrained_head["classifier.3.weight"], expected["classifier.3.weight"])
    assert all(torch.equal(v, expected[k]) for k, v in model.shared.items())
    data = make_image_folder(tmp_path / "d", classes=3, per_class=2, test_per_class=1, size=32)
    model = add_task(model, "first", data, TrainConfig(**{**QUICK, "epochs": 0, "prune": 0.0}))
    state = model.task_module(1).state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in model.shared)  # the ImageNet backbone, untouched
    assert state["classifier.3.weight"].shape == (3, 1024)


def test_pretrained_edge_weights_through_torchvisions_api_and_offline(monkeypatch):
    import torchvision
    from torchvision.models._api import WeightsEnum

    local = torchvision.models.mobilenet_v3_small().state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: local)
    state, classes = models.pretrained_state_dict("mobilenet_v3_small")
    assert state is local and len(classes) == 1000

    def offline(self, *args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    r = CliRunner().invoke(app, ["init", "--arch", "efficientnet_b0", "--pretrained", "-o", "/tmp/never.safetensors"])
    assert r.exit_code == 2 and "--weights PATH" in r.output
