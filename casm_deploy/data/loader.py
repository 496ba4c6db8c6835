"""The training's and validation's data loader: the torch loader, or DALI's where it runs.

`build_loader` is the one entry point the training and the benchmark use; both loaders yield
the same `(images, labels, indices)` batches, images float in [0, 1], (B, 3, S, S),
channels-last. It sits above both (`torch_loader.py`, `dali.py`), which never import it.
"""

from __future__ import annotations

from pathlib import Path

from casm_deploy.common.devices import resolve_device
from casm_deploy.data import dali  # dali.dali_available, looked up at each call
from casm_deploy.data.dali import DALILoader
from casm_deploy.data.imagenet import list_images
from casm_deploy.data.torch_loader import ImageDataset, TorchLoader
from casm_deploy.data.transforms import RRC_SCALE, TRAIN_RESIZES
from casm_deploy.errors import UserError

LOADERS = ("torch", "dali", "auto")  # auto: DALI when it imports, else torch


def build_loader(
    root: str | Path,
    split: str,
    wnids: list[str],
    image_size: int,
    batch_size: int,
    *,
    train: bool,
    workers: int = 1,
    seed: int = 0,
    fraction: float = 1.0,
    policy: str = "center-crop",
    crop_scale: float = RRC_SCALE[0],
    loader: str = "torch",
    limit: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    device: str = "cpu",
    skip_bad: bool = False,
) -> TorchLoader | DALILoader:
    """The training and validation data loader: a TorchLoader or a `dali.DALILoader`.

    Both yield the same `(images, labels, indices)` batches and have `len`, `set_epoch` and
    `samples`. `loader`: "torch", "dali", or "auto" (DALI when it imports, else torch).
    `limit` keeps the first N images of the split (0: all of them). `shard_id` / `num_shards`
    (global rank / world size) give each process its block of every epoch; `device` is where
    the batches go (cpu, auto, cuda, cuda:N): DALI decodes there, the torch loader decodes on
    the CPU and sends its batches there. `crop_scale`: the smallest area share of the
    random-resized-crop policy's windows (torchvision's 0.08 by default). `skip_bad`: a file
    that does not decode is skipped (the torch loader's `bad_files` lists them) instead of
    stopping the pass with a UserError.

    Raises:
        UserError: an unknown loader, "dali" where DALI does not import, or "dali" for training
            with the "stretch" policy or with `skip_bad`.
    """
    if loader not in LOADERS:
        raise UserError(f"--loader {loader!r}: choose one of {', '.join(LOADERS)}")
    if not 0 <= shard_id < num_shards:
        raise UserError(f"shard {shard_id} of {num_shards}: need 0 <= shard_id < num_shards")
    loader = choose_loader(loader, train=train, policy=policy, skip_bad=skip_bad)
    samples = list_images(root, split, wnids)
    if limit > 0:
        samples = samples[:limit]
    shards = {"shard_id": shard_id, "num_shards": num_shards}
    if loader == "dali":
        options = {"workers": workers, "seed": seed, "fraction": fraction, "policy": policy}
        options["crop_scale"] = crop_scale
        return DALILoader(
            samples, image_size, batch_size, train=train, device=device, **options, **shards
        )
    if device == "auto":
        device = resolve_device("auto").type
    dataset = ImageDataset(
        samples, image_size, train=train, seed=seed, policy=policy, crop_scale=crop_scale
    )
    options = {"workers": workers, "fraction": fraction, "device": device, "skip_bad": skip_bad}
    return TorchLoader(dataset, batch_size, shuffle=train, drop_last=train, **options, **shards)


def choose_loader(loader: str, *, train: bool, policy: str, skip_bad: bool) -> str:
    """ "torch" or "dali": the loader `build_loader` builds when `loader` (one of `LOADERS`) is
    asked for.

    Raises:
        UserError: an unknown policy, "dali" where DALI does not import, or "dali" for training
            with the "stretch" policy or with `skip_bad`.
    """
    if policy not in TRAIN_RESIZES:
        raise UserError(f"unknown resize policy {policy!r}: use {', '.join(TRAIN_RESIZES)}")
    if train and policy == "stretch" and loader != "torch":
        # DALILoader's training pipeline always takes a random crop and flip; only the torch
        # loader trains on whole stretched images.
        if loader == "dali":
            raise UserError(
                "--loader dali cannot train with --resize stretch (its training pipeline always "
                "crops and flips); use --loader torch"
            )
        loader = "torch"
    if skip_bad and loader != "torch":
        # DALI fails the whole pipeline on a file it cannot decode; it cannot skip one.
        if loader == "dali":
            raise UserError("--loader dali cannot skip bad images; use --loader torch")
        loader = "torch"
    if loader == "torch":
        return loader
    if dali.dali_available():
        return "dali"
    if loader == "dali":
        raise UserError(
            "--loader dali: NVIDIA DALI does not import here; "
            "install it with `pip install nvidia-dali-cuda120` or use --loader torch"
        )
    return "torch"
