"""The product's promise: later tasks never change what earlier tasks compute."""

import pytest
import torch
from conftest import TINY_ARCH, TINY_CONFIG, TINY_TASKS, make_image_folder, train_tiny
from torch import nn

from packnet_export import checkpoint, masks, models
from packnet_export.errors import PackNetError, ParameterError
from packnet_export.training import Observer, TrainConfig, add_task


@pytest.fixture(scope="module")
def snapshots(tiny_data):
    """The model after each task, trained with momentum and weight decay on."""
    snaps = []
    train_tiny(tiny_data, snapshots=snaps, weight_decay=0.05, momentum=0.9)
    return snaps


def test_earlier_tasks_give_bit_identical_logits_after_later_tasks(snapshots, probe_inputs):
    final = snapshots[-1]
    for k, snap in enumerate(snapshots, start=1):
        with torch.no_grad():
            when_finished = snap.task_module(k)(probe_inputs)
            after_all = final.task_module(k)(probe_inputs)
        assert torch.equal(when_finished, after_all), f"task {k} changed after later tasks were added"


def test_frozen_weights_are_bitwise_unchanged_with_momentum_and_weight_decay(snapshots):
    for k, snap in enumerate(snapshots[:-1], start=1):
        for later in snapshots[k:]:
            for key, owner in snap.owners.items():
                used = masks.uses(owner, k)
                assert torch.equal(later.owners[key][used], owner[used])
                # compare the bit patterns, so that -0.0 and 0.0 count as different
                assert torch.equal(later.shared[key][used].view(torch.int32), snap.shared[key][used].view(torch.int32))


def test_shared_batch_norm_is_frozen_after_the_first_task(snapshots):
    first, final = snapshots[0], snapshots[-1]
    for key in first.norm_bias_keys():
        assert torch.equal(first.shared[key], final.shared[key]), key
    assert all(set(t) == set(models.head_keys("vgg_mini")) for t in final.task_tensors)


def test_pruning_frees_the_requested_share_per_layer_and_every_tie(snapshots):
    """Task 1 starts from random weights (no ties): it keeps exactly half. Later tasks start
    from freed weights, which are 0, and those that never get a gradient are still 0 when
    pruned: the official pruner frees every weight at or below the cutoff, so those keep less."""
    final = snapshots[-1]
    extra = 0
    for key, owner in final.owners.items():
        n = owner.numel()
        first = n - round(0.5 * n)
        assert int((owner == 1).sum()) == first
        free_after_1 = n - first
        second = int((owner == 2).sum())
        assert second <= free_after_1 - round(0.75 * free_after_1)
        extra += free_after_1 - round(0.75 * free_after_1) - second
        pruned_weights = final.shared[key][owner == masks.FREE]
        assert torch.equal(pruned_weights.view(torch.int32), torch.zeros_like(pruned_weights).view(torch.int32))
        assert not bool((final.shared[key][owner != masks.FREE] == 0).any()), f"a task owns an exact zero in {key}"
    assert extra > 0, "this model has ties at task 2's cutoff; the test relies on them"


def test_per_task_norm_keeps_each_tasks_own_batch_norm(tiny_data, probe_inputs):
    snaps = []
    final = train_tiny(tiny_data, per_task_norm=True, snapshots=snaps, tasks=TINY_TASKS[:2])
    bn = [k for k in final.norm_bias_keys() if k.endswith("running_mean")][0]
    assert not torch.equal(final.task_tensors[0][bn], final.task_tensors[1][bn])
    with torch.no_grad():
        assert torch.equal(snaps[0].task_module(1)(probe_inputs), final.task_module(1)(probe_inputs))


def test_evaluating_a_task_does_not_touch_the_stored_weights(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.shared.items()}
    tiny_model.task_module(1)
    assert all(torch.equal(before[k], tiny_model.shared[k]) for k in before)


def test_logits_survive_a_checkpoint_round_trip(tiny_model, tmp_path, probe_inputs):
    path = tmp_path / "m.safetensors"
    checkpoint.save(tiny_model, path)
    loaded = checkpoint.load(path)
    for k in range(1, len(TINY_TASKS) + 1):
        with torch.no_grad():
            assert torch.equal(tiny_model.task_module(k)(probe_inputs), loaded.task_module(k)(probe_inputs))
    assert loaded.metadata() == tiny_model.metadata()


def test_the_best_epoch_is_chosen_on_validation_and_test_is_only_reported(tiny_model):
    info = tiny_model.tasks[0]
    history = info.training["history"]
    assert all("val_top1" in r for r in history)
    assert {"val_top1", "test_top1", "test_top5", "test_images"} <= set(info.metrics)
    assert info.metrics["test_images"] == 3 * 3


class _StopAfter(Observer):
    def __init__(self, epochs: int) -> None:
        self.left = epochs

    def epoch(self, record):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop_after", [1, 3])
def test_an_interrupted_task_resumes_to_the_same_result(tiny_data, tmp_path, stop_after):
    base = train_tiny(tiny_data, tasks=TINY_TASKS[:1])
    config = TrainConfig(**{**TINY_CONFIG, "epochs": 3, "finetune_epochs": 2, "momentum": 0.9, "weight_decay": 0.01})
    straight = add_task(base, "beta", tiny_data["beta"], config)
    resume = tmp_path / "out.resume"
    with pytest.raises(KeyboardInterrupt):
        add_task(base, "beta", tiny_data["beta"], config, _StopAfter(stop_after), resume)
    assert resume.exists()
    resumed = add_task(base, "beta", tiny_data["beta"], config, None, resume)
    a, b = straight.tensors(), resumed.tensors()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_file_from_other_settings_is_refused(tiny_data, tmp_path):
    base = train_tiny(tiny_data, tasks=TINY_TASKS[:1])
    resume = tmp_path / "out.resume"
    config = TrainConfig(**{**TINY_CONFIG, "epochs": 2})
    with pytest.raises(KeyboardInterrupt):
        add_task(base, "beta", tiny_data["beta"], config, _StopAfter(1), resume)
    with pytest.raises(PackNetError, match="other settings"):
        add_task(base, "beta", tiny_data["beta"], TrainConfig(**{**TINY_CONFIG, "lr": 0.5}), None, resume)


def test_a_task_name_that_exists_is_refused(tiny_model, tiny_data):
    with pytest.raises(PackNetError, match="already exists"):
        add_task(tiny_model, "alpha", tiny_data["alpha"], TrainConfig(**TINY_CONFIG))


def test_no_free_weights_left_is_a_clear_error(tiny_data):
    model = train_tiny(tiny_data, tasks=TINY_TASKS[:1], prune=0.0)
    with pytest.raises(PackNetError, match="no free weights"):
        add_task(model, "beta", tiny_data["beta"], TrainConfig(**TINY_CONFIG))


def test_empty_class_folder_is_a_clear_error(tmp_path):
    data = make_image_folder(tmp_path / "d", classes=2)
    (data / "train" / "empty_class").mkdir()
    model = checkpoint.PackNet.create(**TINY_ARCH)
    with pytest.raises(PackNetError, match="empty_class"):
        add_task(model, "x", data, TrainConfig(**TINY_CONFIG))


def test_training_on_a_checkpoint_made_from_local_pretrained_weights(tiny_model, tiny_data, tmp_path):
    """The path a user with downloaded ImageNet weights takes: init --weights, then --pretrained-head."""
    state = tiny_model.task_state_dict(1)
    model = checkpoint.PackNet.create(pretrained=state, **TINY_ARCH)
    assert torch.equal(model.pretrained_head["fc.weight"], state["fc.weight"])
    config = TrainConfig(**{**TINY_CONFIG, "epochs": 0, "finetune_epochs": 0, "use_pretrained_head": True})
    new = add_task(model, "alpha", tiny_data["alpha"], config)
    assert torch.equal(new.task_tensors[0]["fc.weight"], state["fc.weight"])
    assert not new.pretrained_head


class _Steps(Observer):
    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []

    def step(self, loss: float, steps: int = 1) -> None:
        self.calls.append((loss, steps))


def test_on_a_gpu_losses_are_read_in_batches_yet_every_step_is_counted():
    """The GPU path must not wait for the device after every step, and must still catch divergence."""
    from packnet_export.training import _LossLog

    observer = _Steps()
    log = _LossLog(torch.device("cuda"), observer, lr=0.1, check_finite=True, interval_s=3600.0)
    for value, images in [(1.0, 8), (2.0, 8), (4.0, 4)]:
        log.add(torch.tensor(value), images)
    assert observer.calls == []  # nothing read yet: no wait for the device
    total, seen = log.finish()
    assert (total, seen) == (1.0 * 8 + 2.0 * 8 + 4.0 * 4, 20)
    assert observer.calls == [(pytest.approx(7 / 3), 3)]

    log = _LossLog(torch.device("cuda"), _Steps(), lr=0.1, check_finite=True, interval_s=3600.0)
    log.add(torch.tensor(1.0), 8)
    log.add(torch.tensor(float("nan")), 8)
    with pytest.raises(PackNetError, match="training diverged.*learning rate 0.1"):
        log.finish()


def _pooled_batch_norm_net(num_classes: int = 10) -> nn.Module:
    """Batch norm after global pooling: one value per channel and image, as at the end of the
    MobileNets, EfficientNets and RegNets at 32 px."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4, num_classes))


@pytest.fixture
def pooled_batch_norm():
    models.register_builder("pooled_bn", _pooled_batch_norm_net, default_image_size=8)
    yield "pooled_bn"
    models.unregister("pooled_bn")


def test_a_last_batch_of_one_image_joins_the_batch_before_while_batch_norm_trains(pooled_batch_norm, tmp_path):
    """9 images in batches of 4: 4 + 5 while batch norm trains (torch refuses batch norm over one
    value per channel), 4 + 4 + 1 once it is frozen; every image is used either way."""
    data = {n: make_image_folder(tmp_path / n, classes=3, per_class=3, test_per_class=1, size=8, seed=i)
            for i, n in enumerate(("a", "b"))}
    config = TrainConfig(epochs=1, finetune_epochs=0, lr=0.01, batch_size=4, val_fraction=0.0)
    steps = _Steps()
    model = add_task(checkpoint.PackNet.create(pooled_batch_norm), "a", data["a"], config, steps)
    assert [n for _, n in steps.calls] == [1, 1] and model.tasks[0].training["history"][0]["images"] == 9
    steps = _Steps()
    model = add_task(model, "b", data["b"], config, steps)  # shared batch norm: frozen, in eval mode
    assert [n for _, n in steps.calls] == [1, 1, 1] and model.tasks[1].training["history"][0]["images"] == 9


def test_batches_of_one_image_for_batch_norm_are_refused_naming_the_batch_size(pooled_batch_norm, tmp_path):
    data = make_image_folder(tmp_path / "d", classes=2, per_class=2, test_per_class=1, size=8)
    config = TrainConfig(epochs=1, finetune_epochs=0, lr=0.01, batch_size=1, val_fraction=0.0)
    with pytest.raises(ParameterError, match="batch norm.*batch of one image.*batch_size 2 or more") as exc:
        add_task(checkpoint.PackNet.create(pooled_batch_norm), "a", data, config)
    assert exc.value.parameter == "batch_size"


def test_a_later_task_on_a_network_already_nan_in_evaluation_says_the_lr_is_not_the_cause(tiny_data):
    """A checkpoint from before add-task checked evaluation mode can hold a task whose frozen batch
    norm overflows; the next task's first loss is then NaN before any update."""
    model = train_tiny(tiny_data, tasks=TINY_TASKS[:1])
    key = next(k for k in model.shared if k.endswith("running_var"))
    model.shared[key] = torch.full_like(model.shared[key], -1.0)  # sqrt of a negative variance: NaN
    with pytest.raises(PackNetError, match="training cannot start: the loss is nan before the first update"):
        add_task(model, "beta", tiny_data["beta"], TrainConfig(**TINY_CONFIG))


def _slow_batch_norm_net(num_classes: int = 10) -> nn.Module:
    """Batch norm with torchvision's mobilenet_v3/efficientnet momentum, 0.01."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.01), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, num_classes))


class _Messages(Observer):
    def __init__(self) -> None:
        self.texts: list[str] = []

    def message(self, text: str) -> None:
        self.texts.append(text)


def test_recomputed_batch_norm_statistics_are_the_average_over_the_training_images(tmp_path, probe_inputs):
    """With momentum 0.01 a short run leaves the running averages near their start (mean 0, var 1),
    and add-task says so; recomputed, they are the per-batch average over the training images
    (evaluation transform), and a later task still leaves the first task's outputs bit-identical."""
    from packnet_export.data import load_split

    models.register_builder("slow_bn", _slow_batch_norm_net, default_image_size=16)
    try:
        data = {n: make_image_folder(tmp_path / n, classes=3, per_class=4, test_per_class=1, size=16, seed=i)
                for i, n in enumerate(("a", "b"))}
        base = dict(epochs=1, finetune_epochs=1, lr=0.01, batch_size=4, val_fraction=0.0)
        told = _Messages()
        plain = add_task(checkpoint.PackNet.create("slow_bn", per_task_norm=True), "a", data["a"],
                         TrainConfig(**base), told)
        assert any("recompute_bn_stats" in t and "initial values" in t for t in told.texts), told.texts
        model = add_task(checkpoint.PackNet.create("slow_bn", per_task_norm=True), "a", data["a"],
                         TrainConfig(**base, recompute_bn_stats=True))

        module = model.task_module(1).eval()
        images = load_split(data["a"], "train", 16, model.mean, model.std)
        batches = torch.stack([images[i][0] for i in range(len(images))]).split(4)
        with torch.no_grad():
            features = [module[0](x) for x in batches]  # the convolution's outputs, batch norm's inputs
        mean = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
        var = torch.stack([f.transpose(0, 1).flatten(1).var(1) for f in features]).mean(0)
        assert torch.allclose(module[1].running_mean, mean, atol=1e-5)
        assert torch.allclose(module[1].running_var, var, rtol=1e-4)
        assert not torch.allclose(plain.task_module(1)[1].running_mean, mean, atol=1e-2)

        with torch.no_grad():
            before = model.task_module(1).eval()(probe_inputs)
        later = add_task(model, "b", data["b"], TrainConfig(**base, recompute_bn_stats=True))
        with torch.no_grad():
            assert torch.equal(later.task_module(1).eval()(probe_inputs), before)
    finally:
        models.unregister("slow_bn")


def test_with_recomputed_statistics_each_epoch_is_judged_as_it_would_be_saved(tmp_path, monkeypatch):
    """The best epoch is chosen on validation computed with the statistics the task would be
    saved with: before each epoch's validation and the pruned weights' score, and once at the end."""
    from packnet_export import training

    judged = []
    real = training.recompute_bn_stats

    def recording(module, dataset, batch_size, device="cpu"):
        judged.append(len(dataset))
        return real(module, dataset, batch_size, device)

    monkeypatch.setattr(training, "recompute_bn_stats", recording)
    models.register_builder("slow_bn", _slow_batch_norm_net, default_image_size=16)
    try:
        data = make_image_folder(tmp_path / "a", classes=3, per_class=8, test_per_class=1, size=16)
        config = TrainConfig(epochs=2, finetune_epochs=1, lr=0.05, batch_size=4, val_fraction=0.5,
                             recompute_bn_stats=True)
        model = add_task(checkpoint.PackNet.create("slow_bn"), "a", data, config)
        assert judged == [12] * 5  # 2 training epochs, the pruned weights, 1 fine-tuning epoch, the end
        assert model.tasks[0].training["history"][-1]["phase"] == "finetune"
    finally:
        models.unregister("slow_bn")
