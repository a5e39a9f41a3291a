"""Owner-mask semantics: who owns what after assigning and pruning."""

import torch

from packnet_export import masks


def test_assign_free_hands_only_free_weights_to_the_new_task():
    owner = torch.tensor([0, 1, 0, 2, 0], dtype=torch.uint8)
    new = masks.assign_free({"w": owner}, 3)["w"]
    assert new.tolist() == [3, 1, 3, 2, 3]
    assert owner.tolist() == [0, 1, 0, 2, 0], "the input mask must not be modified"


def test_prune_frees_exactly_the_fraction_of_the_task_weights_with_smallest_magnitude():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    owner = torch.randint(1, 3, (64, 32), dtype=torch.uint8)  # tasks 1 and 2
    mine = owner == 2
    new_w, new_o = masks.prune_task({"w": w}, {"w": owner}, task=2, fraction=0.75)
    kept = new_o["w"] == 2
    assert int(kept.sum()) == int(mine.sum()) - round(0.75 * int(mine.sum()))
    freed = mine & (new_o["w"] == masks.FREE)
    assert float(w[freed].abs().max()) <= float(w[kept].abs().min())
    assert torch.equal(new_w["w"][freed], torch.zeros(int(freed.sum())))
    # task 1's weights and their values are untouched
    assert torch.equal(new_o["w"][owner == 1], owner[owner == 1])
    assert torch.equal(new_w["w"][~freed], w[~freed])


def test_prune_zero_fraction_changes_nothing():
    w = torch.randn(10)
    owner = torch.ones(10, dtype=torch.uint8)
    new_w, new_o = masks.prune_task({"w": w}, {"w": owner}, 1, 0.0)
    assert torch.equal(new_w["w"], w) and torch.equal(new_o["w"], owner)


def test_a_task_uses_its_own_and_earlier_weights_only():
    owner = torch.tensor([0, 1, 2, 3], dtype=torch.uint8)
    w = torch.tensor([5.0, 6.0, 7.0, 8.0])
    assert masks.masked_weights({"w": w}, {"w": owner}, 2)["w"].tolist() == [0.0, 6.0, 7.0, 0.0]
    assert w.tolist() == [5.0, 6.0, 7.0, 8.0]


def test_owner_counts():
    owner = torch.tensor([0, 1, 1, 2], dtype=torch.uint8)
    assert masks.owner_counts(owner, 3) == [1, 2, 1, 0]


def _official_pruning_mask(w: torch.Tensor, owner: torch.Tensor, task: int, fraction: float) -> torch.Tensor:
    """``SparsePruner.pruning_mask`` of the official src/prune.py, transcribed: the owner mask after pruning."""
    tensor = w[owner.eq(task)]
    cutoff_rank = round(fraction * tensor.numel())
    cutoff_value = tensor.abs().view(-1).kthvalue(cutoff_rank)[0]
    remove_mask = w.abs().le(cutoff_value) & owner.eq(task)
    mask = owner.clone()
    mask[remove_mask] = 0
    return mask


def test_prune_frees_every_tie_at_the_cutoff_as_the_official_pruner_does():
    torch.manual_seed(0)
    # magnitudes on a coarse grid: many ties, as weights that never got a gradient (all exactly 0) make
    w = torch.randint(-8, 9, (40, 30)).float() * 0.25
    owner = torch.randint(1, 3, (40, 30), dtype=torch.uint8)
    for fraction in (0.1, 0.25, 0.5, 0.75):
        new_w, new_o = masks.prune_task({"w": w}, {"w": owner}, task=2, fraction=fraction)
        assert torch.equal(new_o["w"], _official_pruning_mask(w, owner, 2, fraction)), fraction
        mine = owner == 2
        freed = mine & (new_o["w"] == masks.FREE)
        assert int(freed.sum()) >= round(fraction * int(mine.sum()))  # ties can free more than asked
        kept = new_o["w"] == 2
        assert float(w[freed].abs().max()) < float(w[kept].abs().min())  # never half of a tie
        assert not bool((w[kept] == 0).any())
        assert torch.equal(new_w["w"][freed], torch.zeros(int(freed.sum())))
        assert torch.equal(new_w["w"][~freed], w[~freed])


def test_prune_zero_fraction_frees_exactly_the_zeros():
    w = torch.tensor([0.0, -0.0, 0.5, -1.0, 0.0, 2.0])
    owner = torch.tensor([1, 1, 1, 1, 2, 1], dtype=torch.uint8)
    new_w, new_o = masks.prune_task({"w": w}, {"w": owner}, 1, 0.0)
    assert new_o["w"].tolist() == [0, 0, 1, 1, 2, 1]  # task 2's zero is not task 1's to free
    assert torch.equal(new_w["w"].view(torch.int32), torch.tensor([0.0, 0.0, 0.5, -1.0, 0.0, 2.0]).view(torch.int32))
