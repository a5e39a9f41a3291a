"""Owner masks: who owns which weight.

One ``uint8`` tensor per prunable weight, same shape: 0 = free (pruned or never used),
k = owned by task k (1-based, in training order). Task k runs with every weight whose
owner is in 1..k; weights of later tasks and free weights read as zero.
"""

from __future__ import annotations

import torch

FREE = 0
MAX_TASKS = 255


def uses(owner: torch.Tensor, task: int) -> torch.Tensor:
    """Boolean mask of the weights task ``task`` computes with (its own and earlier tasks')."""
    return (owner >= 1) & (owner <= task)


def assign_free(owners: dict[str, torch.Tensor], task: int) -> dict[str, torch.Tensor]:
    """Hand every free weight to ``task``; returns new masks."""
    return {k: torch.where(o == FREE, torch.full_like(o, task), o) for k, o in owners.items()}


def prune_task(
    weights: dict[str, torch.Tensor], owners: dict[str, torch.Tensor], task: int, fraction: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Free the ``fraction`` of ``task``'s weights with the smallest magnitude, layer by layer.

    Exactly ``round(fraction * n)`` of the n weights the task owns in each layer are freed
    (ties broken by position, so the result is deterministic) and set to zero. Weights of
    other tasks are untouched. Returns new (weights, owners).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
    new_w, new_o = {}, {}
    for key, owner in owners.items():
        w, o = weights[key], owner.clone()
        mine = (o == task).flatten().nonzero().squeeze(1)
        n_prune = int(round(fraction * mine.numel()))
        w = w.clone()
        if n_prune:
            magnitude = w.flatten()[mine].abs().double()
            # stable sort keeps ties in position order: deterministic on every machine
            order = torch.sort(magnitude, stable=True).indices[:n_prune]
            chosen = mine[order]
            o.view(-1)[chosen] = FREE
            w.view(-1)[chosen] = 0
        new_w[key], new_o[key] = w, o
    return new_w, new_o


def masked_weights(
    weights: dict[str, torch.Tensor], owners: dict[str, torch.Tensor], task: int
) -> dict[str, torch.Tensor]:
    """The prunable weights as task ``task`` sees them, without touching ``weights``."""
    return {k: torch.where(uses(owners[k], task), weights[k], torch.zeros((), dtype=weights[k].dtype))
            for k in owners}


def owner_counts(owner: torch.Tensor, num_tasks: int) -> list[int]:
    """Counts of [free, task 1, ..., task num_tasks] in one mask."""
    return torch.bincount(owner.flatten().long(), minlength=num_tasks + 1).tolist()[: num_tasks + 1]
