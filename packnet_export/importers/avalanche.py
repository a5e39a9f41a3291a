"""Import the state dict of Avalanche's ``PackNetModel`` (``avalanche/models/packnet.py``).

``PackNetModel(net)`` replaces every ``nn.Linear`` / ``nn.Conv*d`` of ``net`` by a wrapper
whose original layer sits under ``.wrappee`` and which adds buffers::

    _state, _active_task, _task_count, PRUNED_CODE (255), task_index (uint8, shape of weight),
    visible_mask, unfrozen_mask

and the whole network sits under a top-level ``wrappee.`` (the model keeps its own
``_state``, ``_active_task``, ``_task_count``). Task ids are 0-based. ``task_index`` holds the
task that owns each weight; pruning marks weights 255 and ``freeze_pruned`` then hands them
to the next task id (``_task_count`` after the increment), so after T finished tasks a weight
with ``task_index == T`` (or 255) is free. Task t computes with the weights whose
``task_index <= t``; biases are trained with the first task and then frozen. The classifier
is one shared ``nn.Linear``, wrapped like the rest: each task sees its own part of it.
"""

from __future__ import annotations

import torch

from .. import models
from ..checkpoint import IMAGENET_MEAN, IMAGENET_STD, PackNet, TaskInfo
from ..errors import PackNetError, ParameterError
from . import common

WRAPPER_BUFFERS = ("_state", "_active_task", "_task_count", "PRUNED_CODE", "task_index", "visible_mask",
                   "unfrozen_mask")
PRUNED_CODE = 255
MAX_TASKS = 255


def is_avalanche(obj) -> bool:
    return isinstance(obj, dict) and any(isinstance(k, str) and k.endswith("task_index") for k in obj)


def unwrap_state(state: dict) -> dict:
    """A state dict saved by a training script: the model's, or one nested under a usual key."""
    if is_avalanche(state):
        return state
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and is_avalanche(state.get(key)):
            return state[key]
    raise PackNetError("not an Avalanche PackNetModel state dict: no task_index buffers")


def convert(state: dict, arch: str, image_size: int | None = None, task_names: list[str] | None = None,
            classes: dict[str, list[str]] | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            source: str = "") -> PackNet:
    """A ``PackNet`` whose task k computes what ``PackNetModel`` computes for task id k-1."""
    classes = classes or {}
    state = unwrap_state(state)
    spec = models.get_arch(arch)
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise PackNetError(f"the state dict has a key {str(odd)[:60]!r} that is not a tensor name")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    # ---- how many tasks are finished
    counts = {}
    for key, value in state.items():
        if key.split(".")[-1] == "_task_count":
            if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise PackNetError(f"{key} is not one integer (it holds {value.numel()} {value.dtype} values)")
            counts[key] = int(value.reshape(()))
    if not counts:
        raise PackNetError("the state dict has no _task_count buffer: not an Avalanche PackNetModel")
    n_tasks = counts.get("_task_count", max(counts.values()))
    if n_tasks < 1:
        raise PackNetError("the Avalanche model has no finished task (_task_count is 0)")
    if n_tasks > MAX_TASKS:
        raise PackNetError(f"_task_count is {n_tasks}, but an owner mask holds at most {MAX_TASKS} tasks "
                           "(Avalanche's task_index is uint8, 255 marking pruned weights)")
    common.check_import_options(image_size, mean, std, task_names)
    names = task_names or [f"task_{i}" for i in range(n_tasks)]
    if len(names) != n_tasks:
        raise ParameterError("task_names", f"$task_names gives {len(names)} names, but the model has {n_tasks} "
                             "finished tasks")
    common.check_class_options(classes, names)

    # ---- strip the wrappers: "wrappee.<path>.wrappee.weight" -> "<path>.weight"
    layers = {k[: -len(".task_index")] for k in state if k.endswith(".task_index")}
    plain: dict[str, torch.Tensor] = {}
    task_index: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in WRAPPER_BUFFERS and (prefix in layers or prefix == ""):
            if leaf == "task_index":
                task_index[_strip(prefix + ".weight")] = tensor
            continue
        for layer in layers:
            if key.startswith(layer + ".wrappee."):
                key = layer + "." + key[len(layer) + len(".wrappee."):]
                break
        plain[_strip(key)] = tensor

    head_w_key, head_b_key = models.head_keys(arch)
    if head_w_key not in plain or head_b_key not in plain:
        raise PackNetError(f"the state dict has no {head_w_key} and {head_b_key}: is it a {arch}?")
    num_classes = common.check_head(plain[head_w_key], plain[head_b_key], f"the classifier {head_w_key[:-7]}")
    reference, prunable, head_keys = common.reference_layout(arch, num_classes)
    unknown = sorted(set(plain) - set(reference))
    absent = sorted(set(reference) - set(plain))
    if unknown or absent:
        raise PackNetError(f"the state dict does not match {arch}: "
                           + (f"unexpected {unknown[0]}" if unknown else f"missing {absent[0]}"))
    common.check_shapes(plain, reference, arch)
    for key, ref in reference.items():
        if ref.is_floating_point():
            common.check_tensor(plain[key], key)

    owners: dict[str, torch.Tensor] = {}
    for key in prunable:
        if key not in task_index:
            raise PackNetError(f"{key} has no task_index: the layer was not wrapped by PackNetModel")
        common.check_tensor(task_index[key], f"task_index of {key}", integer=True, shape=reference[key].shape)
        owners[key] = _owners(task_index[key], n_tasks, key)
    shared = {k: plain[k].detach().to(reference[k].dtype).contiguous() for k in reference if k not in head_keys}
    common.zero_free(shared, owners)

    head_index = task_index.get(head_w_key)
    if head_index is not None:
        common.check_tensor(head_index, f"task_index of {head_w_key}", integer=True, shape=plain[head_w_key].shape)
    head_owner = _owners(head_index, n_tasks, head_w_key) if head_index is not None else None
    fractions = common.prune_fractions(owners, n_tasks)
    tasks, task_tensors = [], []
    for k, name in enumerate(names, start=1):
        w = plain[head_w_key].detach().float()
        if head_owner is not None:
            w = torch.where((head_owner >= 1) & (head_owner <= k), w, torch.zeros(()))
        task_tensors.append({head_w_key: w.contiguous(), head_b_key: plain[head_b_key].detach().float().clone()})
        tasks.append(TaskInfo(name=name, classes=common.task_classes(name, num_classes, classes),
                              prune=fractions[k - 1], training={"source": "avalanche", "task_id": k - 1}))
    return PackNet(arch=arch, arch_kwargs={}, image_size=image_size or spec.default_image_size,
                   mean=tuple(mean), std=tuple(std), per_task_norm=False, shared=shared, owners=owners,
                   tasks=tasks, task_tensors=task_tensors,
                   extra={"imported_from": "avalanche", "source_file": source})


def _strip(key: str) -> str:
    return key[len("wrappee."):] if key.startswith("wrappee.") else key


def _owners(index: torch.Tensor, n_tasks: int, key: str) -> torch.Tensor:
    """Avalanche task ids (0-based; n_tasks and 255 = free) as owners (1-based; 0 = free)."""
    index = index.to(torch.int64)
    bad = ((index > n_tasks) & (index != PRUNED_CODE)) | (index < 0)
    if bool(bad.any()):
        value = int(index[bad][0])
        raise PackNetError(f"task_index of {key} holds {value}, not a task id (0 to {n_tasks}, or 255 for pruned): "
                           f"only {n_tasks} tasks are finished")
    owned = index < n_tasks
    return torch.where(owned, index + 1, torch.zeros((), dtype=torch.int64)).to(torch.uint8).contiguous()
