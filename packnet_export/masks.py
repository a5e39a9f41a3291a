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
    """Free ``task``'s weights of smallest magnitude, layer by layer, as the official pruner does.

    In each layer the cutoff is the ``round(fraction * n)``-th smallest magnitude of the n
    weights the task owns, and every one of them with ``|w| <= cutoff`` is freed and set to
    +0.0 (``SparsePruner.pruning_mask`` in the official ``src/prune.py``). Ties at the cutoff
    are all freed, so a layer can free more than the fraction asked for: weights that never
    received a gradient are still exactly 0 and all tie at the bottom. Exact zeros (+0.0 and
    -0.0) are freed whatever the fraction, so ``fraction=0`` frees the zeros and nothing else:
    a zero computes nothing, so freeing it changes no output, and a later task can use it
    where owning it would waste it. The result depends on the values only, never on their
    positions. Weights of other tasks are untouched. Returns new (weights, owners).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
    new_w, new_o = {}, {}
    for key, owner in owners.items():
        w, o = weights[key].clone(), owner.clone()
        mine = o == task
        n_prune = int(round(fraction * int(mine.sum())))
        cutoff = w[mine].abs().kthvalue(n_prune).values if n_prune else w.new_zeros(())
        chosen = mine & (w.abs() <= cutoff)
        o[chosen] = FREE
        w[chosen] = 0
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
