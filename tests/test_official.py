"""Where users compare with the paper's code (arunmallya/packnet), training does what it does.

Ties and zeros at pruning (src/prune.py), no fine-tuning after a last task pruned 0%
(scripts/run_sequence.sh), ImageNet itself as task 1 with a stepped fine-tune lr
(scripts/run_imagenet_pruning.sh), the un-fine-tuned pruned weights competing for the best
epoch (Manager.prune in src/main.py), and pre-cropped data sets squashed to the input size
(train_loader_cropped in src/dataset.py). docs/training.md lists what still differs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_ARCH, TINY_CONFIG, make_image_folder
from packnet_export.cli.main import app
from PIL import Image
from typer.testing import CliRunner

from packnet_export import checkpoint, data, masks, models
from packnet_export.checkpoint import PackNet
from packnet_export.exporter import pipeline, validation
from packnet_export.training import Observer, TrainConfig, add_task, evaluate, evaluate_task

runner = CliRunner()
ZEROED = "features.4.weight"  # the second conv of vgg_mini


def _pretrained_with_zero_taps(seed: int = 3, classes: int = 3) -> dict[str, torch.Tensor]:
    """A 'pretrained' vgg_mini whose second conv has only its centre taps: 8 of 9 weights are exactly 0,
    like the outer 3x3 taps of a layer that sees only padding (resnet18's layer4 at 32 px)."""
    torch.manual_seed(seed)
    state = models.build("vgg_mini", classes, TINY_ARCH["arch_kwargs"]).state_dict()
    centre = torch.zeros(3, 3)
    centre[1, 1] = 1.0
    state[ZEROED] = state[ZEROED] * centre
    return state


def _first_task(tiny_data, prune: float, **config) -> tuple[PackNet, dict[str, torch.Tensor]]:
    state = _pretrained_with_zero_taps()
    model = PackNet.create(pretrained=state, **TINY_ARCH)
    cfg = TrainConfig(**{**TINY_CONFIG, "epochs": 0, "finetune_epochs": 0, "use_pretrained_head": True,
                         "prune": prune, **config})
    return add_task(model, "alpha", tiny_data["alpha"], cfg), state


def test_pruning_frees_every_zero_so_a_layer_frees_more_than_asked(tiny_data):
    model, state = _first_task(tiny_data, prune=0.5)
    for key, owner in model.owners.items():
        n, owned = owner.numel(), int((owner == 1).sum())
        if key == ZEROED:
            # the cutoff (the 50%-th smallest magnitude) is 0: every zero is freed, every non-zero kept
            assert owned == int((state[key] != 0).sum()) == n // 9
        else:
            assert owned == n - round(0.5 * n), key  # random weights have no ties: exactly half
        assert not bool((model.shared[key][owner == 1] == 0).any()), f"task 1 owns an exact zero in {key}"
    assert model.tasks[0].prune == 0.5  # the fraction asked for is what the task records


def test_prune_0_frees_only_the_zeros_which_changes_no_output_and_leaves_them_to_the_next_task(tiny_data,
                                                                                              probe_inputs):
    """The official code does not prune a last task at all and keeps its zeros; this toolkit frees them:
    they compute nothing (the logits stay bit-identical), and a later task can train them."""
    model, state = _first_task(tiny_data, prune=0.0)
    source = models.build("vgg_mini", 3, TINY_ARCH["arch_kwargs"])
    source.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model.task_module(1)(probe_inputs), source.eval()(probe_inputs))
    zeros = state[ZEROED] == 0
    assert torch.equal(model.owners[ZEROED] == masks.FREE, zeros)
    assert all(bool((o == 1).all()) for k, o in model.owners.items() if k != ZEROED)

    second = add_task(model, "beta", tiny_data["beta"], TrainConfig(**TINY_CONFIG))
    assert bool((second.owners[ZEROED][zeros] == 2).any()), "the freed zeros are the next task's capacity"
    with torch.no_grad():
        assert torch.equal(second.task_module(1)(probe_inputs), model.task_module(1)(probe_inputs))


def test_prune_0_skips_fine_tuning_unless_fine_tune_epochs_are_given(tiny_data):
    base = PackNet.create(**TINY_ARCH)
    last = add_task(base, "alpha", tiny_data["alpha"], TrainConfig(**{**TINY_CONFIG, "finetune_epochs": None,
                                                                     "prune": 0.0, "epochs": 1}))
    training = last.tasks[0].training
    assert training["finetune_epochs"] == 0
    assert [r["phase"] for r in training["history"]] == ["train"]

    explicit = add_task(base, "alpha", tiny_data["alpha"], TrainConfig(**{**TINY_CONFIG, "finetune_epochs": 1,
                                                                         "prune": 0.0, "epochs": 1}))
    assert [r["phase"] for r in explicit.tasks[0].training["history"]][-1] == "finetune"

    # after a real pruning, the paper's 10 epochs
    assert TrainConfig().resolved(1).finetune_epochs == TrainConfig(prune=0.3).resolved(2).finetune_epochs == 10


def test_imagenet_as_task_1_from_a_local_weights_file(tmp_path):
    """The paper's first task: the pretrained network itself, pruned 50% with no training first, then
    fine-tuned with the lr stepped down (run_imagenet_pruning.sh: 10 epochs, x0.1 after 5)."""
    state = _pretrained_with_zero_taps(seed=5)
    state[ZEROED] = models.build("vgg_mini", 3, TINY_ARCH["arch_kwargs"]).state_dict()[ZEROED]  # no ties here
    weights = tmp_path / "imagenet.pth"
    torch.save(state, weights)
    images = make_image_folder(tmp_path / "imagenet", classes=3)
    ckpt = tmp_path / "m.safetensors"
    r = runner.invoke(app, [str(a) for a in ("init", "--arch", "vgg_mini", "--width", "4", "--image-size", "16",
                                             "--weights", weights, "-o", ckpt)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [str(a) for a in (
        "add-task", ckpt, "--name", "imagenet", "--data", images, "--pretrained-head", "--epochs", "0",
        "--finetune-epochs", "4", "--finetune-lr", "1e-3", "--finetune-lr-decay-every", "2", "--batch-size", "8",
        "--val-fraction", "0.2", "--json")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["free_fraction"] == pytest.approx(0.5, abs=0.01)
    model = checkpoint.load(ckpt)
    info = model.tasks[0]
    history = info.training["history"]
    assert [r["phase"] for r in history] == ["finetune"] * 4
    assert [r["lr"] for r in history] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    assert info.training["finetune_lr_decay_every"] == 2
    assert "val_top1" in info.training["after_pruning"]
    for key, owner in model.owners.items():
        assert int((owner == 1).sum()) == owner.numel() - round(0.5 * owner.numel()), key
        # what task 1 keeps is the largest half of the pretrained weights
        kept = state[key][owner == 1].abs()
        assert float(kept.min()) >= float(state[key][owner == masks.FREE].abs().max())
    assert not model.pretrained_head


class _Epochs(Observer):
    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.seen = stop_at, 0

    def epoch(self, record):
        self.seen += 1
        if self.seen == self.stop_at:
            raise KeyboardInterrupt


def test_the_pruned_weights_compete_for_the_best_fine_tune_epoch(tiny_data, tmp_path):
    """As Manager.prune: the accuracy right after pruning is the best so far, and a fine-tune epoch
    must beat it. Here fine-tuning barely moves the weights (lr 1e-6), so no epoch does better on the
    validation images (a tie does not win): the result is the pruned model, bit for bit as without
    fine-tuning (before, the last fine-tune epoch was taken whatever its score)."""
    config = dict(TINY_CONFIG, epochs=4, val_fraction=0.25, seed=1, finetune_lr=1e-6)
    base = PackNet.create(**TINY_ARCH)
    tuned = add_task(base, "alpha", tiny_data["alpha"], TrainConfig(**{**config, "finetune_epochs": 2}))
    after = tuned.tasks[0].training["after_pruning"]
    assert after["kept"], "the premise: no fine-tune epoch beats the pruned weights"
    assert not any(r.get("best") for r in tuned.tasks[0].training["history"] if r["phase"] == "finetune")
    untuned = add_task(base, "alpha", tiny_data["alpha"], TrainConfig(**{**config, "finetune_epochs": 0}))
    a, b = tuned.tensors(), untuned.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # interrupted after the first fine-tune epoch, resumed: the same model and the same record
    resume = tmp_path / "r.resume"
    with pytest.raises(KeyboardInterrupt):
        add_task(base, "alpha", tiny_data["alpha"], TrainConfig(**{**config, "finetune_epochs": 2}),
                 _Epochs(stop_at=config["epochs"] + 1), resume)
    resumed = add_task(base, "alpha", tiny_data["alpha"], TrainConfig(**{**config, "finetune_epochs": 2}),
                       None, resume)
    c = resumed.tensors()
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert resumed.metadata() == tuned.metadata()


def test_a_fine_tune_epoch_is_kept_only_when_it_beats_everything_before_it(tiny_model):
    for info in tiny_model.tasks:
        best = info.training["after_pruning"]["val_top1"]
        for record in (r for r in info.training["history"] if r["phase"] == "finetune"):
            assert bool(record.get("best")) == (record["val_top1"] > best)
            best = max(best, record["val_top1"])
        assert info.training["after_pruning"]["kept"] == (best == info.training["after_pruning"]["val_top1"])


# ---------------------------------------------------------------- --resize squash
def _stripe_folder(root, classes: int = 3, per_class: int = 10, test_per_class: int = 3):
    """Wide images (40 x 20) whose class shows only in a stripe at the left edge: resize-and-crop cuts
    it off, squashing keeps it. The middle is the same noise for every class."""
    rng = np.random.default_rng(0)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)][:classes]
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c, colour in enumerate(colours):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, size=(20, 40, 3)).astype(np.uint8)
                pixels[:, :6] = colour
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_squash_keeps_the_whole_image_where_crop_cuts_its_edges(tmp_path):
    image = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8))
    image.paste((255, 255, 255), (0, 0, 6, 20))  # a white stripe at the left edge
    squash = data.eval_transform(16, (0, 0, 0), (1, 1, 1), "squash")(image)
    crop = data.eval_transform(16, (0, 0, 0), (1, 1, 1), "crop")(image)
    assert squash.shape == crop.shape == (3, 16, 16)
    assert float(squash[:, :, 0].min()) > 0.9  # the stripe is there
    assert float(crop.max()) == 0.0  # cut away
    train = data.train_transform(16, (0, 0, 0), (1, 1, 1), "squash")(image)
    assert train.shape == (3, 16, 16) and float(train[:, :, [0, 15]].max()) > 0.9  # flipped or not, never cropped


def test_a_squash_task_is_evaluated_and_validated_as_it_was_trained(tmp_path):
    images = _stripe_folder(tmp_path / "cars_cropped")
    config = TrainConfig(**{**TINY_CONFIG, "epochs": 6, "finetune_epochs": 0, "resize": "squash"})
    model = add_task(PackNet.create(**TINY_ARCH), "cars", images, config)
    path = tmp_path / "m.safetensors"
    checkpoint.save(model, path)
    loaded = checkpoint.load(path)
    assert loaded.tasks[0].resize == "squash"
    assert loaded.tasks[0].training["resize"] == "squash"

    measured = model.tasks[0].metrics["test_top1"]
    assert measured == 100.0, "the premise: the stripes are learnt"
    assert evaluate_task(loaded, "cars", images)["top1"] == measured  # eval reads the stored mode
    r = runner.invoke(app, ["eval", str(path), "--task", "cars", "--data", str(images), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["top1"] == measured
    cropped = data.load_split(images, "test", loaded.image_size, loaded.mean, loaded.std, resize="crop")
    assert evaluate(loaded.task_module(1), cropped)["top1"] < measured  # what a crop would have cost

    x, _ = validation.image_inputs(loaded, 1, images)  # export --data validates on the same inputs
    squashed = data.load_split(images, "test", loaded.image_size, loaded.mean, loaded.std, resize="squash")
    assert torch.equal(x, torch.stack([squashed[i][0] for i in range(len(squashed))]))

    files = pipeline.export(loaded, tmp_path / "onnx", [1], ["dense", "multitask"])  # deployments are told
    meta = {f.format: _onnx_metadata(f.path) for f in files}
    assert meta["dense"]["packnet.resize"] == "squash"
    assert json.loads(meta["multitask"]["packnet.resize"]) == ["squash"]


def test_an_unknown_resize_mode_is_refused_in_training_and_in_a_checkpoint(tiny_data, tiny_checkpoint, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save as st_save

    from packnet_export.errors import PackNetError

    with pytest.raises(PackNetError, match="resize must be crop or squash; got 'stretch'"):
        add_task(PackNet.create(**TINY_ARCH), "x", tiny_data["alpha"], TrainConfig(**{**TINY_CONFIG,
                                                                                        "resize": "stretch"}))
    with safe_open(str(tiny_checkpoint), framework="pt") as f:
        meta = json.loads(f.metadata()["packnet"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["tasks"][0]["resize"] = "stretch"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(st_save(tensors, metadata={"packnet": json.dumps(meta)}))
    with pytest.raises(PackNetError, match="resize 'stretch', not one of crop, squash"):
        checkpoint.load(bad)


def test_a_checkpoint_from_before_resize_existed_reads_as_crop_and_saves_unchanged(tmp_path):
    from conftest import REPO

    sample = REPO / "samples" / "packnet-6task.safetensors"
    model = checkpoint.load(sample)
    assert all(t.resize is None and t.resize_mode == "crop" for t in model.tasks)
    again = tmp_path / "again.safetensors"
    checkpoint.save(model, again)
    assert again.read_bytes() == sample.read_bytes()
    (dense,) = pipeline.export(model, tmp_path / "onnx", [4], ["dense"])
    assert "packnet.resize" not in _onnx_metadata(dense.path)  # its files stay as they were: crop


def _onnx_metadata(path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
