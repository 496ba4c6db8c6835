"""The training loop on a GPU's terms, checked on the CPU: no host syncs per step, statistics
that stay in torch, the pool's storage, pinned batches, and the masked-out fill."""

import contextlib
import copy
import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from casm_deploy.common.ui import progress
from casm_deploy.data import torch_loader as data
from casm_deploy.data.imagenet import read_classes
from casm_deploy.data.loader import build_loader
from casm_deploy.evaluation import metrics
from casm_deploy.evaluation.metrics import mask_stat_sums
from casm_deploy.models.mapping import build_masker
from casm_deploy.training import casm as casm_module
from casm_deploy.training import train
from casm_deploy.training.casm import CASM, StepSettings, masked_out
from casm_deploy.training.distributed import Distributed
from casm_deploy.training.pool import pool_storage
from casm_deploy.training.train import casm_one_epoch, loader_workers, pretrain_one_epoch

# Every way a tensor's value reaches Python: each is a host sync when the tensor is on a GPU.
READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def count_reads():
    """Count the calls of READS on any tensor (torch's own code included) while inside."""
    counts = {"reads": 0}
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(original):
        def read(self, *args, **kwargs):
            counts["reads"] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def tiny_masker(num_classes=3):
    torch.manual_seed(0)
    return build_masker("resnet18", num_classes, width=8)


def train_batches(root, batch_size=4) -> list:
    """One epoch's batches, loaded beforehand: the loader's own reads are host work (its
    shuffle, the DataLoader's seed), not waits for a device."""
    wnids = read_classes(root).wnids
    loader = build_loader(root, "train", wnids, 32, batch_size, train=True, workers=0, fraction=0.5)
    return list(loader)


def fp16_like_casm(monkeypatch, settings: StepSettings) -> CASM:
    """A CASM whose gradient scaler is on, as fp16 on CUDA has it, computing in fp32 on the CPU
    (CPU autocast has no fp16): the scaler's host reads are what this exercises."""
    monkeypatch.setattr(casm_module, "amp_dtype", lambda amp, device_type: None)
    casm = CASM(tiny_masker(), dataclasses.replace(settings, amp="fp16"), random.Random(0))
    assert casm.scaler.is_enabled()
    return casm


def test_a_casm_epoch_reads_the_device_only_for_the_progress_bar(tiny_data, monkeypatch):
    """18 steps, the bar read every 5: 3 reads, and one at the end, whatever the step does
    (pool draws, snapshots, the scaler's inf checks, the clipping, the mask statistics)."""
    monkeypatch.setattr(train, "PROGRESS_EVERY", 5)
    monkeypatch.setattr(metrics.MaskStats, "update", None)  # the numpy path must not run
    loader = train_batches(tiny_data, batch_size=2)
    assert len(loader) == 18
    casm = fp16_like_casm(monkeypatch, StepSettings(smf=5))  # L100, a snapshot every 5
    with progress(disable=True) as bars, count_reads() as counts:
        result = casm_one_epoch(casm, loader, bars, "test")
    assert counts["reads"] == 4
    assert casm.step_count == 18 and len(casm.pool.snapshots) == 4  # steps 0, 4, 9 and 14
    assert 0 <= result["train_acc"] <= 1 and 0 < result["train_mask_mean"] < 1


def test_the_sync_counter_sees_the_scaler_of_an_unfused_optimiser(tiny_data, monkeypatch):
    """The counter can fail: plain (unfused) optimisers make the scaler read `found_inf` on the
    host at every optimiser step, which is why the CASM steps take the fused ones."""
    monkeypatch.setattr(train, "PROGRESS_EVERY", 1000)
    casm = fp16_like_casm(monkeypatch, StepSettings(hp=0.0, smf=None))  # L
    for opt in (casm.opt_classifier, casm.opt_decoder):
        assert opt.defaults["fused"] and opt._step_supports_amp_scaling
        opt._step_supports_amp_scaling = False
        for group in opt.param_groups:
            group["fused"] = None
    loader = train_batches(tiny_data, batch_size=6)
    with progress(disable=True) as bars, count_reads() as counts:
        casm_one_epoch(casm, loader, bars, "test")
    assert counts["reads"] >= 3 * len(loader)  # two classifier steps and a decoder step each


def test_pretraining_reads_the_device_only_for_the_progress_bar(tiny_data, monkeypatch):
    monkeypatch.setattr(train, "PROGRESS_EVERY", 5)
    casm = fp16_like_casm(monkeypatch, StepSettings())
    masker = casm.masker
    opt = torch.optim.Adam(masker.encoder.parameters(), lr=1e-3, fused=casm.fused)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=100)
    loader = train_batches(tiny_data, batch_size=3)  # 12 steps: reads at 5, 10 and the end
    with progress(disable=True) as bars, count_reads() as counts:
        result = pretrain_one_epoch(masker, loader, opt, sched, casm, bars, "test")
    assert counts["reads"] == 3
    assert 0 <= result["train_acc"] <= 1 and result["train_loss"] > 0


def test_device_mask_sums_match_the_numpy_statistics():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 1, 17, 23, generator=generator)
    masks[0] = 0.0  # all-zero and all-one masks: no entropy
    masks[1] = 1.0
    masks[2, 0, :4] = 1.0  # saturated pixels inside a mask
    expected, streamed = metrics.MaskStats(), metrics.MaskStats()
    expected.update(masks)
    for part in (masks[:2], masks[2:]):
        streamed.add_sums(mask_stat_sums(part).tolist())
    for key, value in expected.result().items():
        assert streamed.result()[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert mask_stat_sums(masks).dtype == torch.float64


def test_pool_storage_choices(monkeypatch):
    model = torch.nn.Linear(1000, 1000)  # 4 MB of fp32 weights per snapshot
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    for choice in ("auto", "device", "pinned"):
        assert pool_storage(choice, cpu, 30, model) == (cpu, False)
    props = type("Props", (), {})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    props.total_memory = 5 * 30 * 4_004_000  # the pool is exactly a fifth: it stays on the GPU
    assert pool_storage("auto", cuda, 30, model) == (cuda, False)
    props.total_memory -= 5
    assert pool_storage("auto", cuda, 30, model) == (cpu, True)
    assert pool_storage("device", cuda, 30, model) == (cuda, False)
    assert pool_storage("pinned", cuda, 30, model) == (cpu, True)


def test_a_drawn_snapshot_classifies_as_the_snapshot_loaded_into_a_model():
    masker = tiny_masker()
    casm = CASM(masker, StepSettings(hp=1.0, smf=1), random.Random(0))
    casm.pool.store(masker.encoder)
    reference = copy.deepcopy(masker.encoder).eval()
    with torch.no_grad():
        for p in masker.encoder.parameters():
            p.add_(0.1)  # the live classifier moves on; the snapshot must not
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        drawn, _ = casm.pool_classifier(0)(masker.normalize(images))
        expected, _ = reference(masker.normalize(images))
    assert torch.equal(drawn, expected)
    assert casm.pool.weights(0, torch.device("cpu")) is casm.pool.snapshots[0]  # no copy


def test_pool_snapshots_round_trip_through_a_checkpoint():
    masker = tiny_masker()
    casm = CASM(masker, StepSettings(), random.Random(0))
    casm.pool.store(masker.encoder)
    saved = casm.pool.on_cpu()
    again = CASM(tiny_masker(), StepSettings(), random.Random(0))
    again.pool.load(saved)
    (a,), (b,) = casm.pool.snapshots, again.pool.snapshots
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.parametrize("choice", ["device", "pinned"])
def test_pool_on_a_gpu_draws_the_same_classifier(choice):
    masker = tiny_masker().cuda()
    settings = StepSettings(hp=1.0, smf=1, pool_device=choice)
    casm = CASM(masker, settings, random.Random(0))
    casm.pool.store(masker.encoder)
    snapshot = casm.pool.snapshots[0]
    assert all(t.is_cuda == (choice == "device") for t in snapshot.values())
    assert all(t.is_pinned() for t in snapshot.values()) or choice == "device"
    images = torch.rand(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        drawn, _ = casm.pool_classifier(0)(masker.normalize(images))
        expected, _ = masker.encoder.eval()(masker.normalize(images))
    torch.testing.assert_close(drawn, expected)


def test_the_torch_loader_pins_its_batches_for_a_gpu(tiny_data, monkeypatch):
    seen = []

    class Recording:
        def __init__(self, dataset, **kwargs):
            seen.append(kwargs)

        def __iter__(self):
            images = torch.full((2, 32, 32, 3), 255, dtype=torch.uint8)
            # CheckedDataset's items: image, label, index, problems ("" when none)
            return iter([(images, torch.tensor([0, 1]), torch.tensor([0, 1]), ["", ""])])

    monkeypatch.setattr(data, "DataLoader", Recording)
    wnids = read_classes(tiny_data).wnids
    for device, pinned in (("cpu", False), ("cuda", True)):
        loader = build_loader(tiny_data, "train", wnids, 32, 2, train=True, device=device)
        assert loader.device == torch.device(device)
        if device == "cpu":
            ((images, _, _),) = list(loader)
            assert images.dtype == torch.float32 and images.max() == 1.0  # scaled after the copy
            assert images.is_contiguous(memory_format=torch.channels_last)
        else:  # the copy to a GPU fails here; the DataLoader was made first
            with contextlib.suppress(RuntimeError, AssertionError):
                next(iter(loader))
        assert seen[-1]["pin_memory"] is pinned


@pytest.mark.gpu
def test_the_torch_loader_sends_float_batches_to_the_gpu(tiny_data):
    wnids = read_classes(tiny_data).wnids
    loader = build_loader(tiny_data, "train", wnids, 32, 4, train=True, workers=0, device="cuda")
    images, labels, indices = next(iter(loader))
    assert images.is_cuda and labels.is_cuda and not indices.is_cuda
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_loader_workers_default_to_the_cores_on_cuda(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert loader_workers(None, cpu, Distributed()) == 1
    assert loader_workers(None, cuda, Distributed()) == 16
    assert loader_workers(None, cuda, Distributed(world=8, local_world=8)) == 2
    assert loader_workers(3, cuda, Distributed()) == 3


def test_masked_out_fill_black_or_the_mean_colour():
    masker = tiny_masker()
    images = torch.rand(2, 3, 8, 8)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, :4] = 1.0  # the top half is salient: masked out
    black = masked_out(masker, images, masks, "black")
    mean = masked_out(masker, images, masks, "mean")
    torch.testing.assert_close(black, masker.normalize(images * (1 - masks)))
    assert torch.equal(mean[:, :, :4], torch.zeros_like(mean[:, :, :4]))  # the mean colour
    torch.testing.assert_close(mean[:, :, 4:], masker.normalize(images)[:, :, 4:])
    colour = black[:, :, :4] * masker.std + masker.mean  # black in [0, 1]
    assert colour.abs().max() < 1e-6
    assert not np.allclose(black.numpy(), mean.numpy())


def test_a_mean_fill_step_trains(tiny_data):
    images, labels = torch.rand(6, 3, 32, 32), torch.arange(6) % 3
    casm = CASM(tiny_masker(), StepSettings(fill="mean"), random.Random(0))
    out = casm.step(images, labels)
    assert torch.isfinite(out.loss_mapping) and casm.step_count == 1


def test_imagenet_recipe_trains_at_toy_size_through_the_cli(tiny_data, tmp_path, make_checkpoint):
    """`--recipe imagenet` end to end, shrunk by the options given beside it: the reference's
    RandomResizedCrop, mean fill, lambda_r of L100 and pool, starting from --weights."""
    import json

    from typer.testing import CliRunner

    from casm_deploy.cli import app

    weights = make_checkpoint(tmp_path / "start.pt", tiny_data, image_size=32, width=8)
    args = ["train", str(tiny_data), "--recipe", "imagenet", "--weights", weights]
    args += ["--arch", "resnet18", "--width", "8", "--image-size", "32", "--batch-size", "8"]
    args += ["--epochs", "1", "--out", str(tmp_path), "--name", "r", "--workers", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (stored["recipe"], stored["fill"], stored["resize"]) == (
        "imagenet",
        "mean",
        "random-resized-crop",
    )
    assert (stored["lambda_r"], stored["epoch_fraction"], stored["pretrain_epochs"]) == (
        None,
        0.2,
        0,
    )
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["phase"] == "casm" and 0 <= last["val_LE"] <= 1
