import numpy as np
import pytest
import torch

from casm_deploy.data.datasets import (
    ImageDataset,
    TorchLoader,
    build_loader,
    decode_image,
    list_images,
    own_boxes,
    read_annotation,
    read_classes,
    stretch,
    transform_box,
)
from casm_deploy.errors import UserError

XML = """<annotation><size><width>200</width><height>100</height><depth>3</depth></size>
<object><name>n1</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>60</xmax><ymax>80</ymax>
</bndbox></object>
<object><name>n2</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>5</xmax><ymax>5</ymax>
</bndbox></object>
<object><name>n1</name><bndbox><xmin>150</xmin><ymin>10</ymin><xmax>200</xmax><ymax>90</ymax>
</bndbox></object></annotation>"""


def test_read_annotation_with_several_objects_and_classes(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(XML)
    annotation = read_annotation(path)
    assert (annotation.width, annotation.height) == (200, 100)
    assert annotation.boxes_of("n1") == [[10, 20, 60, 80], [150, 10, 200, 90]]
    assert annotation.boxes_of("n2") == [[0, 0, 5, 5]]
    assert annotation.boxes_of("n3") == []


@pytest.mark.parametrize("content", ["<annotation>", "<annotation></annotation>", ""])
def test_malformed_annotation_names_the_file(tmp_path, content):
    path = tmp_path / "bad.xml"
    path.write_text(content)
    with pytest.raises(UserError, match="bad.xml"):
        read_annotation(path)


def test_transform_box_center_crop_by_hand():
    # 200 x 100 -> shorter side 64: scale 0.64, width 128, crop cuts 32 px on the left.
    assert transform_box([10, 20, 60, 80], 200, 100, 64) == [-25, 12, 6, 51]
    # Portrait 100 x 200: the crop cuts 32 px at the top.
    assert transform_box([20, 10, 80, 60], 100, 200, 64, "center-crop") == [12, -25, 51, 6]


def test_transform_box_stretch_by_hand():
    assert transform_box([10, 20, 60, 80], 200, 100, 64, "stretch") == [3, 12, 19, 51]
    with pytest.raises(UserError):
        transform_box([0, 0, 1, 1], 10, 10, 64, "squash")
    with pytest.raises(UserError, match="squash"):  # the images refuse it as the boxes do
        ImageDataset([], 64, train=False, policy="squash")


def test_transform_box_matches_the_image_transform(tiny_data):
    """A box drawn into an image lands where the loader's centre crop puts those pixels."""
    import cv2

    image = np.zeros((90, 150, 3), np.uint8)
    image[30:60, 60:100] = 255
    path = tiny_data.parent / "probe.png"
    cv2.imwrite(str(path), image)
    dataset = ImageDataset([(path, 0)], size=48, train=False)
    crop = dataset[0][0][..., 0] > 127
    ys, xs = np.nonzero(crop)
    box = transform_box([60, 30, 100, 60], 150, 90, 48)
    assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1
    assert abs(ys.min() - box[1]) <= 1 and abs(ys.max() + 1 - box[3]) <= 1


def test_classes_and_images_of_the_synthetic_set(tiny_data):
    info = read_classes(tiny_data)
    assert len(info.wnids) == 3 and info.wnids == sorted(info.wnids)
    samples = list_images(tiny_data, "val", info.wnids)
    assert len(samples) == 12 and {label for _, label in samples} == {0, 1, 2}


def test_missing_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data synth"):
        read_classes(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not an ImageNet layout"):
        read_classes(tmp_path)


def test_classes_of_a_split_alone_when_asked(tmp_path):
    for wnid in ("n2", "n1"):
        (tmp_path / "val" / wnid).mkdir(parents=True)
    with pytest.raises(UserError, match="not an ImageNet layout"):
        read_classes(tmp_path)  # training needs classes.txt or train/
    info = read_classes(tmp_path, split="val")  # eval of a test set of its own classes
    assert info.wnids == info.names == ["n1", "n2"]
    (tmp_path / "train" / "n3").mkdir(parents=True)
    assert read_classes(tmp_path, split="val").wnids == ["n3"]  # train/ comes first


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


def test_own_boxes_keeps_the_images_class_only(tmp_path):
    (tmp_path / "img1.xml").write_text(XML)
    assert own_boxes(tmp_path / "img1.JPEG", "n2", tmp_path, 64, "stretch") == [[0, 0, 1, 3]]
    assert len(own_boxes(tmp_path / "img1.JPEG", "n1", tmp_path, 64)) == 2
    with pytest.raises(UserError, match="no box of class n3"):
        own_boxes(tmp_path / "img1.JPEG", "n3", tmp_path, 64)
    with pytest.raises(UserError, match="img2.xml"):
        own_boxes(tmp_path / "img2.JPEG", "n1", tmp_path, 64)


def test_random_resized_crop_windows_follow_torchvision():
    """RandomResizedCrop's draw: an area share in [0.08, 1], an aspect ratio in [3/4, 4/3], the
    window inside the image; an image too elongated for ten tries gets the centred fallback."""
    from casm_deploy.data.datasets import random_resized_crop_box

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
    from casm_deploy.data.datasets import ImageDataset, list_images, read_classes, transform_box

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
