"""The ImageNet layout: class lists, image lists, ILSVRC boxes and their transform."""

import cv2
import numpy as np
import pytest

from casm_deploy.data.imagenet import (
    has_object_masks,
    list_images,
    own_boxes,
    own_object_mask,
    read_annotation,
    read_classes,
    transform_box,
)
from casm_deploy.data.torch_loader import ImageDataset
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


def test_own_boxes_keeps_the_images_class_only(tmp_path):
    (tmp_path / "img1.xml").write_text(XML)
    assert own_boxes(tmp_path / "img1.JPEG", "n2", tmp_path, 64, "stretch") == [[0, 0, 1, 3]]
    assert len(own_boxes(tmp_path / "img1.JPEG", "n1", tmp_path, 64)) == 2
    with pytest.raises(UserError, match="no box of class n3"):
        own_boxes(tmp_path / "img1.JPEG", "n3", tmp_path, 64)
    with pytest.raises(UserError, match="img2.xml"):
        own_boxes(tmp_path / "img2.JPEG", "n1", tmp_path, 64)


def test_own_object_mask_in_the_model_frame(tmp_path):
    """The XML's three objects (n1, n2, n1) painted 1, 2, 3 in a 200 x 100 mask."""
    (tmp_path / "img1.xml").write_text(XML)
    assert not has_object_masks(tmp_path)
    objects = np.zeros((100, 200), np.uint8)
    objects[20:80, 10:60], objects[0:5, 0:5], objects[10:90, 150:200] = 1, 2, 3
    cv2.imwrite(str(tmp_path / "img1.png"), objects)
    assert has_object_masks(tmp_path)
    image = tmp_path / "img1.JPEG"
    # Stretched to 50 x 50 (x / 4, y / 2): both n1 objects, not n2's corner.
    stretched = own_object_mask(image, "n1", tmp_path, 50, "stretch")
    assert stretched.dtype == bool and stretched.shape == (50, 50)
    assert stretched[25, 8] and stretched[25, 45] and not stretched[0, 0]
    assert own_object_mask(image, "n2", tmp_path, 50, "stretch")[0, 0]
    # Centre crop: 100 x 50, columns 25-74 kept. The second n1 object is cut away; the first,
    # columns 10-59 and rows 20-79, samples to columns 5-29 and rows 10-39 before the crop.
    cropped = own_object_mask(image, "n1", tmp_path, 50)
    assert np.flatnonzero(cropped.any(0)).tolist() == list(range(0, 5))
    assert np.flatnonzero(cropped.any(1)).tolist() == list(range(10, 40))


def test_a_bad_object_mask_names_the_file(tmp_path):
    (tmp_path / "img1.xml").write_text(XML)
    image = tmp_path / "img1.JPEG"
    with pytest.raises(UserError, match=r"img1\.png: object mask not found"):
        own_object_mask(image, "n1", tmp_path, 32)
    cv2.imwrite(str(tmp_path / "img1.png"), np.zeros((100, 100), np.uint8))
    with pytest.raises(UserError, match=r"img1\.png: the label map is 100x100, its image 200x100"):
        own_object_mask(image, "n1", tmp_path, 32)
    cv2.imwrite(str(tmp_path / "img1.png"), np.full((100, 200), 4, np.uint8))
    with pytest.raises(UserError, match=r"img1\.png: has label 4, but img1\.xml lists 3 objects"):
        own_object_mask(image, "n1", tmp_path, 32)
    (tmp_path / "img1.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"img1\.png: cannot decode the object mask"):
        own_object_mask(image, "n1", tmp_path, 32)
