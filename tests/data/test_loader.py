"""The loaders: the torch loader's images and order, the resize policies, build_loader, and
the loaders' decoder, which reads and decodes files as infer does."""

import io

import numpy as np
import pytest
import torch
from pictures import scene
from PIL import Image, ImageOps

from casm_deploy.data.decode import decode_image, read_image, resize_square
from casm_deploy.data.imagefiles import EXTENSIONS, ImageError, read_file, scan
from casm_deploy.data.imagenet import list_images, read_classes, transform_box
from casm_deploy.data.loader import build_loader
from casm_deploy.data.torch_loader import ImageDataset, TorchLoader
from casm_deploy.data.transforms import random_resized_crop_box, stretch
from casm_deploy.errors import UserError


def test_loader_batches_are_channels_last_floats(tiny_data):
    info = read_classes(tiny_data)
    loader = build_loader(tiny_data, "train", info.wnids, 32, 8, train=True, workers=0)
    images, labels, indices = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert images.min() >= 0 and images.max() <= 1
    assert labels.dtype == torch.int64 and len(set(indices.tolist())) == 8
    assert len(loader) == 72 // 8


def test_training_augmentation_depends_on_seed_epoch_and_index_only(tiny_data):
    info = read_classes(tiny_data)
    samples = list_images(tiny_data, "train", info.wnids)
    a = ImageDataset(samples, 32, train=True, seed=1)
    b = ImageDataset(samples, 32, train=True, seed=1)
    assert np.array_equal(a[5][0], b[5][0])
    b.epoch = 1
    assert any(not np.array_equal(a[i][0], b[i][0]) for i in range(10))


def test_stretch_training_keeps_the_whole_image_unflipped(tiny_data):
    """--resize stretch: the whole image at S x S in every epoch, no crop, no flip."""
    info = read_classes(tiny_data)
    samples = list_images(tiny_data, "train", info.wnids)
    dataset = ImageDataset(samples, 32, train=True, seed=1, policy="stretch")
    for epoch in range(3):
        dataset.epoch = epoch
        for index in (0, 5, 17, 40):
            image, label, got_index = dataset[index]
            expected = stretch(decode_image(samples[index][0]), 32)
            assert np.array_equal(image, expected), (epoch, index)
            assert (label, got_index) == (samples[index][1], index)


def test_dali_cannot_train_with_stretch(tiny_data):
    info = read_classes(tiny_data)
    args = (tiny_data, "train", info.wnids, 32, 8)
    with pytest.raises(UserError, match="--resize stretch"):
        build_loader(*args, train=True, policy="stretch", loader="dali")
    loader = build_loader(*args, train=True, policy="stretch", loader="auto", workers=0)
    assert isinstance(loader, TorchLoader)  # auto picks the loader that can
    from casm_deploy.data.dali import DALILoader

    with pytest.raises(UserError, match="stretch"):
        DALILoader(loader.samples, 32, 8, train=True, policy="stretch")


def test_epoch_fraction_and_shuffling_are_seeded(tiny_data):
    info = read_classes(tiny_data)
    loader = build_loader(tiny_data, "train", info.wnids, 32, 4, train=True, fraction=0.5)
    first = loader.indices()
    assert len(first) == 36 and first == loader.indices()
    loader.set_epoch(1)
    assert loader.indices() != first
    val = build_loader(tiny_data, "val", info.wnids, 32, 5, train=False, workers=0)
    assert val.indices() == list(range(12)) and len(val) == 3


def test_undecodable_image_names_the_file(tmp_path):
    path = tmp_path / "broken.JPEG"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="broken.JPEG"):
        ImageDataset([(path, 0)], 32, train=False)[0]


def test_random_resized_crop_windows_follow_torchvision():
    """RandomResizedCrop's draw: an area share in [0.08, 1], an aspect ratio in [3/4, 4/3], the
    window inside the image; an image too elongated for ten tries gets the centred fallback."""
    rng = np.random.default_rng(0)
    shares, ratios = [], []
    for _ in range(500):
        top, left, h, w = random_resized_crop_box(375, 500, rng)
        assert top >= 0 and top + h <= 375 and left >= 0 and left + w <= 500
        shares.append(h * w / (375 * 500))
        ratios.append(w / h)
    assert 0.07 < min(shares) < 0.15 and max(shares) > 0.9 and max(shares) <= 1.0
    assert min(ratios) > 0.74 and max(ratios) < 1.35
    assert random_resized_crop_box(10, 400, np.random.default_rng(0)) == (0, 193, 10, 13)


def test_random_resized_crop_policy_trains_on_windows_and_validates_on_the_centre(tiny_data):
    samples = list_images(tiny_data, "train", read_classes(tiny_data).wnids)[:8]
    rrc = ImageDataset(samples, 32, train=True, seed=1, policy="random-resized-crop")
    crop = ImageDataset(samples, 32, train=True, seed=1, policy="center-crop")
    images = [rrc[i][0] for i in range(8)]
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in images)
    assert any(not np.array_equal(a, crop[i][0]) for i, a in enumerate(images))
    assert np.array_equal(rrc[3][0], images[3])  # (seed, epoch, index) decide the window
    val = ImageDataset(samples, 32, train=False, policy="random-resized-crop")
    centre = ImageDataset(samples, 32, train=False, policy="center-crop")
    assert val.policy == "center-crop" and np.array_equal(val[0][0], centre[0][0])
    box = [10, 20, 60, 50]
    assert transform_box(box, 80, 60, 32, "random-resized-crop") == transform_box(box, 80, 60, 32)


def test_crop_scale_sets_the_smallest_window(tmp_path):
    """--crop-scale: windows of at least that share of the area; at 1 a square image is kept
    whole (only the flip is left)."""
    rng = np.random.default_rng(0)
    shares = []
    for _ in range(300):
        top, left, h, w = random_resized_crop_box(375, 500, rng, scale=(0.5, 1.0))
        shares.append(h * w / (375 * 500))
    assert 0.48 < min(shares) < 0.6
    path = tmp_path / "square.png"
    Image.fromarray(scene(48, 48)).save(path)
    whole = ImageDataset(
        [(path, 0)] * 8, 48, train=True, policy="random-resized-crop", crop_scale=1
    )
    image = decode_image(path)
    for k in range(8):
        got = whole[k][0]
        assert np.array_equal(got, image) or np.array_equal(got, image[:, ::-1])


# --- The loaders' decoder: the same reading and decoding as infer's ----------------------------


def _encode(image: np.ndarray, kind: str, orientation: int = 1) -> bytes:
    picture = Image.fromarray(image)
    exif = picture.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, kind, exif=exif, **({"quality": 95} if kind in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["PNG", "BMP", "TIFF"])
def test_the_loaders_decode_as_infer_does(tmp_path, kind):
    image = scene(37, 53)
    path = tmp_path / f"a.{kind.lower()}"
    path.write_bytes(_encode(image, kind))
    whole = decode_image(path)
    assert whole.dtype == np.uint8 and np.array_equal(whole, image)  # lossless: the pixels
    assert np.array_equal(resize_square(whole, 24), read_image(path, 24)[0])


@pytest.mark.parametrize("kind", ["JPEG", "PNG", "WEBP"])
def test_the_loaders_show_the_image_as_oriented(tmp_path, kind):
    path = tmp_path / f"a.{kind.lower()}"
    path.write_bytes(_encode(scene(30, 40), kind, orientation=6))
    with Image.open(path) as picture:
        shown = np.asarray(ImageOps.exif_transpose(picture).convert("RGB"))
    whole = decode_image(path)
    assert whole.shape == shown.shape == (40, 30, 3)
    assert np.abs(whole.astype(int) - shown).mean() < (2 if kind == "PNG" else 6)


def test_the_loaders_errors_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.JPEG"
    garbage.write_bytes(b"this is not a JPEG" * 20)
    with pytest.raises(UserError) as caught:
        decode_image(garbage)
    assert str(caught.value) == f"{garbage}: cannot decode image"
    gone = tmp_path / "gone.JPEG"
    with pytest.raises(UserError) as caught:
        decode_image(gone)
    assert str(caught.value) == f"{gone}: cannot read image (No such file or directory)"
    with pytest.raises(ImageError, match="^file not found$"):  # infer's reason, as it was
        read_file(gone)


def test_one_list_of_extensions_for_the_layout_and_the_scan(tmp_path):
    folder = tmp_path / "train" / "n1"
    folder.mkdir(parents=True)
    png = _encode(scene(8, 8), "PNG")
    names = [f"a{k}{ext.upper() if k % 2 else ext}" for k, ext in enumerate(EXTENSIONS)]
    for name in [*names, "notes.txt", "clip.gif"]:
        (folder / name).write_bytes(png)
    listed = [path.name for path, _ in list_images(tmp_path, "train", ["n1"])]
    scanned = [entry.path.name for entry in scan(tmp_path)]
    assert listed == scanned == sorted(names)
