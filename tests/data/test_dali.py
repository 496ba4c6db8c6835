"""The DALI loader against the torch loader: same samples, order, indices, and images."""

import numpy as np
import pytest
import torch

from casm_deploy.data.decode import decode_image
from casm_deploy.data.imagenet import read_classes
from casm_deploy.data.loader import build_loader
from casm_deploy.data.torch_loader import TorchLoader
from casm_deploy.data.transforms import resize_shorter, stretch
from casm_deploy.errors import UserError

TOLERANCE = 2 / 255  # mean |difference| allowed between two JPEG decoders and resize filters


@pytest.fixture
def dali():
    return pytest.importorskip("nvidia.dali")


def collect(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return tuple(torch.cat([batch[i].cpu() for batch in batches]) for i in range(3))


def loaders(root, split: str, batch_size: int, **kwargs):
    wnids = read_classes(root).wnids
    common = dict(workers=1, **kwargs)
    torch_loader = build_loader(root, split, wnids, 32, batch_size, loader="torch", **common)
    dali_loader = build_loader(root, split, wnids, 32, batch_size, loader="dali", **common)
    return torch_loader, dali_loader


@pytest.mark.usefixtures("dali")
@pytest.mark.parametrize("policy", ["center-crop", "stretch"])
def test_validation_matches_the_torch_loader(tiny_data, policy):
    # 12 images in batches of 5: the last batch is partial and must carry no padding.
    torch_loader, dali_loader = loaders(tiny_data, "val", 5, train=False, policy=policy)
    images, labels, indices = collect(torch_loader)
    dali_images, dali_labels, dali_indices = collect(dali_loader)
    assert len(dali_loader) == len(list(dali_loader)) == 3
    assert dali_indices.tolist() == indices.tolist() == list(range(12))
    assert torch.equal(dali_labels, labels) and dali_labels.dtype == torch.int64
    assert (dali_images - images).abs().mean() <= TOLERANCE


@pytest.mark.usefixtures("dali")
def test_training_batches_keep_the_loader_contract(tiny_data):
    torch_loader, dali_loader = loaders(tiny_data, "train", 8, train=True, seed=3)
    samples = dali_loader.samples
    for epoch in (0, 1):
        torch_loader.set_epoch(epoch)
        dali_loader.set_epoch(epoch)
        batches = list(dali_loader)
        assert len(batches) == len(dali_loader) == len(torch_loader) == 72 // 8
        images, labels, indices = batches[0]
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert images.min() >= 0 and images.max() <= 1
        assert labels.dtype == indices.dtype == torch.int64
        assert labels.tolist() == [samples[i][1] for i in indices.tolist()]
        # The same samples in the same order as the torch loader, epoch by epoch.
        order = torch.cat([batch[2] for batch in batches]).tolist()
        assert order == torch_loader.indices()


@pytest.mark.usefixtures("dali")
def test_training_images_are_flipped_crops_of_the_resized_image(tiny_data):
    _, dali_loader = loaders(tiny_data, "train", 8, train=True)
    images, _, indices = next(iter(dali_loader))
    for image, index in zip(images.permute(0, 2, 3, 1).numpy(), indices.tolist(), strict=True):
        resized = resize_shorter(decode_image(dali_loader.samples[index][0]), 32) / 255
        h, w = resized.shape[:2]
        candidates = [
            crop[:, ::-1] if flip else crop
            for top in range(h - 31)
            for left in range(w - 31)
            for crop in [resized[top : top + 32, left : left + 32]]
            for flip in (False, True)
        ]
        assert min(np.abs(image - c).mean() for c in candidates) <= TOLERANCE


@pytest.mark.usefixtures("dali")
def test_training_epoch_is_reproducible_and_fraction_is_honoured(tiny_data):
    _, dali_loader = loaders(tiny_data, "train", 4, train=True, fraction=0.5)
    dali_loader.set_epoch(5)
    first, again = collect(dali_loader), collect(dali_loader)
    assert len(dali_loader) == 36 // 4 and len(first[2]) == 36
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.usefixtures("dali")
def test_two_shards_cover_the_validation_set_once(tiny_data):
    seen = []
    for shard_id in (0, 1):
        torch_loader, dali_loader = loaders(
            tiny_data, "val", 4, train=False, shard_id=shard_id, num_shards=2
        )
        indices = collect(dali_loader)[2].tolist()
        assert indices == collect(torch_loader)[2].tolist()
        assert len(dali_loader) == 2  # 6 images: a full batch and a partial one
        seen += indices
    assert sorted(seen) == list(range(12))


@pytest.mark.usefixtures("dali")
def test_training_shards_are_disjoint_and_as_long(tiny_data):
    shards = []
    for shard_id in (0, 1):
        _, dali_loader = loaders(tiny_data, "train", 8, train=True, shard_id=shard_id, num_shards=2)
        shards.append(collect(dali_loader)[2].tolist())
        assert len(dali_loader) == 36 // 8
    assert len(shards[0]) == len(shards[1]) == 32 and not set(shards[0]) & set(shards[1])


@pytest.mark.usefixtures("dali")
def test_auto_picks_dali_where_it_imports(tiny_data):
    from casm_deploy.data.dali import DALILoader

    wnids = read_classes(tiny_data).wnids
    loader = build_loader(tiny_data, "val", wnids, 32, 4, train=False, loader="auto")
    assert isinstance(loader, DALILoader)
    images, labels, indices = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and indices.tolist() == [0, 1, 2, 3]


def test_loader_choice_errors_and_fallback(tiny_data, monkeypatch):
    import casm_deploy.data.dali

    wnids = read_classes(tiny_data).wnids
    with pytest.raises(UserError, match="torch, dali, auto"):
        build_loader(tiny_data, "val", wnids, 32, 4, train=False, loader="ffcv")
    monkeypatch.setattr(casm_deploy.data.dali, "dali_available", lambda: False)
    with pytest.raises(UserError, match="nvidia-dali-cuda120"):
        build_loader(tiny_data, "val", wnids, 32, 4, train=False, loader="dali")
    loader = build_loader(tiny_data, "val", wnids, 32, 4, train=False, loader="auto")
    assert isinstance(loader, TorchLoader)


@pytest.mark.gpu
@pytest.mark.usefixtures("dali")
def test_mixed_gpu_pipeline_matches_the_cpu_pipeline(tiny_data):
    _, cpu_loader = loaders(tiny_data, "val", 5, train=False)
    _, gpu_loader = loaders(tiny_data, "val", 5, train=False, device="cuda")
    images, labels, indices = next(iter(gpu_loader))
    assert images.is_cuda and images.is_contiguous(memory_format=torch.channels_last)
    assert not labels.is_cuda and not indices.is_cuda
    cpu_images, cpu_labels, cpu_indices = collect(cpu_loader)
    gpu_images, gpu_labels, gpu_indices = collect(gpu_loader)
    assert torch.equal(gpu_indices, cpu_indices) and torch.equal(gpu_labels, cpu_labels)
    assert (gpu_images - cpu_images).abs().mean() <= TOLERANCE
    from casm_deploy.data.dali import DALILoader

    half = DALILoader(cpu_loader.samples, 32, 8, train=True, device="cuda", dtype=torch.float16)
    images, _, _ = next(iter(half))
    assert images.dtype == torch.float16 and images.is_cuda and images.shape == (8, 3, 32, 32)


@pytest.mark.usefixtures("dali")
def test_random_resized_crop_training_pipeline(tiny_data):
    _, dali_loader = loaders(tiny_data, "train", 8, train=True, policy="random-resized-crop")
    images, labels, indices = next(iter(dali_loader))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01
    assert len(set(indices.tolist())) == 8


@pytest.mark.usefixtures("dali")
def test_crop_scale_reaches_the_dali_pipeline(tiny_data):
    """--crop-scale 1: every random-resized-crop window is the whole image (its ratio within
    3/4 to 4/3), so each training image is the image stretched to S x S, or its flip."""
    wnids = read_classes(tiny_data).wnids
    options = dict(train=True, loader="dali", policy="random-resized-crop", workers=1)
    for scale, close in ((1.0, True), (0.08, False)):
        loader = build_loader(tiny_data, "train", wnids, 32, 8, crop_scale=scale, **options)
        images, _, indices = next(iter(loader))
        errors = []
        for image, index in zip(images.permute(0, 2, 3, 1).numpy(), indices.tolist(), strict=True):
            whole = stretch(decode_image(loader.samples[index][0]), 32) / 255
            errors.append(min(np.abs(image - whole).mean(), np.abs(image - whole[:, ::-1]).mean()))
        assert (max(errors) <= 4 * TOLERANCE) == close, (scale, errors)
