"""Shared fixtures: a tiny synthetic data set (made once per session) and the `gpu` marker."""

from __future__ import annotations

import pytest
import torch

from casm_deploy.common.files import remove_tree
from casm_deploy.config import SynthConfig


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def deep_tmp_path(tmp_path):
    """tmp_path, emptied after the test without recursion: pytest removes old temporary
    folders with shutil.rmtree, which overflows Python's stack on a tree 1,000 folders deep."""
    yield tmp_path
    for path in tmp_path.iterdir():
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """3 classes, 24 train and 4 val images each, shorter sides 40-56 px."""
    from casm_deploy.data.synth import generate

    out = tmp_path_factory.mktemp("data") / "synth"
    generate(
        SynthConfig(
            out=str(out),
            num_classes=3,
            train_per_class=24,
            val_per_class=4,
            min_side=40,
            max_side=56,
            workers=1,
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def make_small_synth():
    """Writes a small data set of the named classes (1 train, 2 val images each, 40-48 px)."""

    def write(out, classes: tuple[str, ...]):
        from casm_deploy.data.synth import generate

        config = SynthConfig(
            out=str(out),
            classes=classes,
            train_per_class=1,
            val_per_class=2,
            min_side=40,
            max_side=48,
            workers=1,
        )
        generate(config, progress=False)
        return out

    return write


@pytest.fixture(scope="session")
def make_checkpoint():
    """Writes a checkpoint of the real schema with random weights for a data set's classes."""

    def write(path, data, image_size: int = 32, seed: int = 0, width: int = 8) -> str:
        from casm_deploy.checkpoint import save_untrained
        from casm_deploy.data.imagenet import read_classes

        info = read_classes(data)
        kwargs = {"width": width, "image_size": image_size, "seed": seed}
        return str(save_untrained(path, info.wnids, info.names, **kwargs))

    return write


@pytest.fixture(scope="session")
def make_exports(make_checkpoint):
    """Writes a random-weight checkpoint for a data set's classes and its fp32 exports
    (`deploy.exporters.export_masker`, no parity check): {"eager": checkpoint, format: path}."""

    def write(folder, data, image_size: int = 32, formats=("torchscript", "onnx")) -> dict:
        from pathlib import Path

        from casm_deploy.deploy.export.exporters import export_masker

        checkpoint = Path(make_checkpoint(Path(folder) / "checkpoint.pt", data, image_size))
        return {"eager": checkpoint, **export_masker(checkpoint, folder, formats)}

    return write
