"""Import checkpoints written by the paper's code (github.com/arunmallya/packnet, ``src/main.py``).

Its ``Manager.save_model`` writes ``torch.save`` of a dict::

    model            networks.ModifiedVGG16 / ModifiedVGG16BN / ModifiedResNet / ModifiedDenseNet:
                     .shared (the torchvision backbone), .classifiers (ModuleList of heads),
                     .datasets (names, aligned with .classifiers), .classifier (the active head)
    previous_masks   {position in enumerate(model.shared.modules()): uint8 mask}; 0 = pruned,
                     k = owned by the dataset whose dataset2idx is k
    dataset2idx      {dataset name: k}, 1-based ("imagenet": 1 for the released models)
    dataset2biases   (only with --train_biases) {dataset: {module position: bias}}
    args, epoch, accuracy, errors   the run's argparse.Namespace and its last test errors

The official evaluation of dataset k (``Manager.eval``) zeroes the weights whose mask is 0 or
greater than k, restores k's biases when ``dataset2biases`` holds them, and runs the shared
network (batch norm as stored: it is frozen after the first dataset unless --train_bn) with
k's classifier. The import reproduces exactly that per task.
"""

from __future__ import annotations

import math
import re

import torch

from ..checkpoint import IMAGENET_MEAN, IMAGENET_STD, PackNet, TaskInfo
from ..errors import PackNetError
from . import common
from .safe_pickle import InertModule, named_modules

ARCH_OF_CLASS = {
    "networks.ModifiedVGG16": "vgg16",
    "networks.ModifiedVGG16BN": "vgg16_bn",
    "networks.ModifiedResNet": "resnet50",
    "networks.ModifiedDenseNet": "densenet121",
}
PRUNABLE_CLASSES = ("Conv2d", "Linear")
# old torchvision DenseNet layers named their children "norm.1", "conv.2"; today's use "norm1"
_OLD_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(.+)$")


def is_official(obj) -> bool:
    return isinstance(obj, dict) and "model" in obj and "previous_masks" in obj


def _key_mapper(arch: str, shared: InertModule):
    """A function from a parameter path inside ``shared`` to the torchvision state-dict key."""
    if arch in ("vgg16", "vgg16_bn"):
        names = list(shared.children)
        kinds = [shared.children[n].class_name for n in names]
        if "View" not in kinds:
            raise PackNetError("the VGG network's shared part has no View layer before fc6")
        n_features = kinds.index("View")
        linears = [n for n, k in zip(names[n_features:], kinds[n_features:]) if k == "Linear"]
        if len(linears) != 2:
            raise PackNetError(f"the VGG network's shared part has {len(linears)} fully connected layers, expected "
                               "2 (fc6, fc7)")
        position = {n: i for i, n in enumerate(names)}
        fc = {linears[0]: "classifier.0", linears[1]: "classifier.3"}

        def vgg(path: str) -> str:
            child, _, rest = path.partition(".")
            if child in fc:
                return f"{fc[child]}.{rest}"
            if position.get(child, n_features) < n_features:
                return f"features.{child}.{rest}"
            raise PackNetError(f"unexpected tensor {path} in the VGG network")

        return vgg
    if arch == "resnet50":
        return lambda path: path
    if arch == "densenet121":
        def densenet(path: str) -> str:
            match = _OLD_DENSENET.match(path)
            return f"features.{match.group(1)}{match.group(2)}.{match.group(3)}" if match else f"features.{path}"

        return densenet
    raise AssertionError(arch)


def _dataset2idx(raw) -> dict[str, int]:
    """``dataset2idx`` checked: dataset names to whole indices 1..255 (an owner mask is uint8)."""
    if not isinstance(raw, dict) or not raw:
        raise PackNetError("dataset2idx is not a dict of dataset names to indices")
    out = {}
    for name, index in raw.items():
        if not isinstance(name, str) or not name.isprintable() or not name:
            raise PackNetError(f"dataset2idx has key {str(name)[:40]!r}, not a dataset name")
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= 255:
            raise PackNetError(f"dataset2idx[{name!r}] is {str(index)[:40]!r}, not a dataset index from 1 to 255")
        out[name] = index
    return out


def _float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _plain_args(args) -> dict:
    raw = vars(args) if hasattr(args, "__dict__") else (args if isinstance(args, dict) else {})
    return {str(k): v for k, v in raw.items() if isinstance(v, (str, int, float, bool)) or v is None}


def convert(ckpt: dict, classes: dict[str, list[str]] | None = None, source: str = "") -> PackNet:
    """A ``PackNet`` computing, for each dataset, what the official code's eval computes."""
    classes = classes or {}
    for key in ("model", "previous_masks", "dataset2idx"):
        if key not in ckpt:
            raise PackNetError(f"not an official PackNet checkpoint: it has no {key!r} entry")
    net = ckpt["model"]
    if not isinstance(net, InertModule) or net.source_class not in ARCH_OF_CLASS:
        found = getattr(net, "source_class", type(net).__name__)
        raise PackNetError(f"the checkpoint's model is {found}, not one of {', '.join(ARCH_OF_CLASS)}")
    arch = ARCH_OF_CLASS[net.source_class]
    shared_net = net.children.get("shared")
    heads_net = net.children.get("classifiers")
    datasets = net.__dict__.get("datasets")
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise PackNetError("the checkpoint's model.datasets is not a list of dataset names")
    if not isinstance(shared_net, InertModule) or not isinstance(heads_net, InertModule):
        raise PackNetError("the checkpoint's model lacks its shared or classifiers part")
    heads = list(heads_net.children.values())
    if len(heads) != len(datasets):
        raise PackNetError(f"the model has {len(heads)} classifiers for {len(datasets)} datasets")

    # ---- tasks, in the order of their mask values
    dataset2idx = _dataset2idx(ckpt["dataset2idx"])
    order = sorted(dataset2idx, key=dataset2idx.get)
    if [dataset2idx[n] for n in order] != list(range(1, len(order) + 1)):
        raise PackNetError(f"dataset2idx {dataset2idx} does not number the datasets 1..{len(order)}")
    missing = [n for n in order if n not in datasets]
    if missing:
        raise PackNetError(f"dataset {missing[0]!r} of dataset2idx has no classifier in the model")
    common.check_class_options(classes, order)

    # ---- shared tensors, renamed to torchvision's keys
    modules = named_modules(shared_net)
    to_key = _key_mapper(arch, shared_net)
    state: dict[str, torch.Tensor] = {}
    for path, module in modules:
        for name, tensor in {**module.parameters, **module.buffers}.items():
            key = to_key(f"{path}.{name}" if path else name)
            if not isinstance(tensor, torch.Tensor):
                raise PackNetError(f"shared.{path}.{name} is a {type(tensor).__name__}, not a tensor")
            state[key] = tensor.detach()
    reference, prunable, head_keys = common.reference_layout(arch)
    expected = {k: v for k, v in reference.items() if k not in head_keys}
    for k, ref in expected.items():
        if k not in state and k.endswith("num_batches_tracked"):
            state[k] = torch.zeros((), dtype=ref.dtype)  # batch norm had no such counter before PyTorch 0.4
    unknown = sorted(set(state) - set(expected))
    absent = sorted(set(expected) - set(state))
    if unknown or absent:
        raise PackNetError(f"the {arch} backbone does not match torchvision's: "
                           + (f"unexpected {unknown[0]}" if unknown else f"missing {absent[0]}"))
    common.check_shapes(state, expected, f"{arch} backbone")
    for k, ref in expected.items():
        if ref.is_floating_point():
            common.check_tensor(state[k], f"backbone tensor {k}")
    state = {k: state[k].to(expected[k].dtype).contiguous() for k in expected}

    # ---- owner masks: previous_masks is keyed by position in shared.modules()
    previous = ckpt["previous_masks"]
    if not isinstance(previous, dict) or not previous:
        raise PackNetError("previous_masks is empty: the checkpoint has no task yet")
    owners: dict[str, torch.Tensor] = {}
    for index, mask in previous.items():
        if not isinstance(index, int) or not 0 <= index < len(modules):
            raise PackNetError(f"previous_masks has key {index!r}, not a module position of the network")
        path, module = modules[index]
        if module.class_name not in PRUNABLE_CLASSES:
            raise PackNetError(f"previous_masks[{index}] belongs to {module.source_class}, not a conv or linear layer")
        key = to_key(f"{path}.weight")
        common.check_tensor(mask, f"previous_masks[{index}] ({key})", integer=True, shape=state[key].shape)
        if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) > 255):
            raise PackNetError(f"previous_masks[{index}] holds {int(mask.min())}..{int(mask.max())}, not dataset "
                               "indices 0..255")
        owners[key] = mask.to(torch.uint8).contiguous()
    if set(owners) != set(prunable):
        lacking = sorted(set(prunable) - set(owners))
        raise PackNetError(f"previous_masks has no mask for {lacking[0]}")
    owners = {k: owners[k] for k in prunable}
    n = len(order)
    top = max(int(o.max()) for o in owners.values())
    if top > n:
        raise PackNetError(f"previous_masks names dataset {top} but dataset2idx has {n}")
    common.zero_free(state, owners)

    # ---- per-dataset biases (--train_biases): keyed by module position too
    bias_of: dict[str, dict[str, torch.Tensor]] = {}
    all_biases = ckpt.get("dataset2biases") or {}
    if not isinstance(all_biases, dict):
        raise PackNetError(f"dataset2biases is a {type(all_biases).__name__}, not a dict of datasets")
    for name, biases in all_biases.items():
        if not isinstance(name, str) or name not in dataset2idx:
            continue
        if not isinstance(biases, dict):
            raise PackNetError(f"dataset2biases[{name!r}] is a {type(biases).__name__}, not a dict of biases")
        mapped = {}
        for index, tensor in biases.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(modules):
                raise PackNetError(f"dataset2biases[{name!r}] has key {str(index)[:40]!r}, not a module position")
            path, _ = modules[index]
            key = to_key(f"{path}.bias")
            if key not in state:
                raise PackNetError(f"dataset2biases[{name!r}][{index}] belongs to a module without a bias")
            common.check_tensor(tensor, f"dataset2biases[{name!r}][{index}] ({key})", shape=state[key].shape)
            mapped[key] = tensor.detach().to(state[key].dtype).contiguous()
        bias_of[str(name)] = mapped
    # a dataset without saved biases ran with the model's current ones, as the official eval does
    bias_keys = _all_bias_keys(bias_of)
    per_task_bias = [{k: bias_of.get(name, {}).get(k, state[k]) for k in bias_keys} for name in order]
    per_task_norm = any(
        any(not torch.equal(a[k], per_task_bias[0][k]) for k in a) for a in per_task_bias[1:]
    )
    if not per_task_norm and per_task_bias and per_task_bias[0]:
        state.update(per_task_bias[0])  # one set of biases serves every task

    # ---- heads, metrics
    head_w, head_b = head_keys
    in_width = reference[head_w].shape[1]
    fractions = common.prune_fractions(owners, n)
    args = ckpt.get("args")
    last = getattr(args, "dataset", None) if args is not None else None
    errors = ckpt.get("errors")
    norm_bias_keys = [k for k in expected if k not in owners]
    tasks, task_tensors = [], []
    for i, name in enumerate(order):
        head = heads[datasets.index(name)]
        if not isinstance(head, InertModule) or head.class_name != "Linear":
            raise PackNetError(f"the classifier of {name!r} is not a Linear layer")
        w, b = head.parameters.get("weight"), head.parameters.get("bias")
        common.check_head(w, b, f"the classifier of {name!r}", in_width)
        own = {head_w: w.detach().float().contiguous(), head_b: b.detach().float().contiguous()}
        if per_task_norm:
            own.update({k: state[k] for k in norm_bias_keys})
            own.update(per_task_bias[i])
        metrics: dict = {}
        if name == last and isinstance(errors, (list, tuple)) and errors:
            top = [_float(e) for e in errors]
            if top[0] is not None:
                metrics["test_top1"] = 100.0 - top[0]
            if len(top) > 1 and top[1] is not None:
                metrics["test_top5"] = 100.0 - top[1]
        training = {"source": "official packnet"}
        if name == last:
            training["args"] = _plain_args(args)
        tasks.append(TaskInfo(name=name, classes=common.task_classes(name, w.shape[0], classes),
                              prune=fractions[i], metrics=metrics, training=training))
        task_tensors.append(own)

    extra = {"imported_from": "official", "source_file": source, "source_class": net.source_class,
             "train_biases": bool(bias_of), "train_bn": bool(getattr(args, "train_bn", False))}
    return PackNet(arch=arch, arch_kwargs={}, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   per_task_norm=per_task_norm, shared=state, owners=owners, tasks=tasks,
                   task_tensors=task_tensors, extra=extra)


def _all_bias_keys(bias_of: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    keys: list[str] = []
    for mapped in bias_of.values():
        keys += [k for k in mapped if k not in keys]
    return keys
