"""The NVIDIA DALI loader: the same `(images, labels, indices)` batches as the torch loader
(`torch_loader.TorchLoader`).

`loader.build_loader(loader="dali")` builds it. Images are decoded on the GPU ("mixed") when
training on CUDA and with DALI's CPU operators otherwise, resized and cropped as
`torch_loader.ImageDataset` does, and handed over as channels-last float batches in [0, 1].

How it matches the torch loader, and where it differs:

- Samples and order: each epoch the file reader gets the epoch's sample list from
  `order.epoch_order`, the very list the torch loader uses (shuffled by (seed, epoch), cut to
  `fraction`), with `random_shuffle` off. So both loaders see the same samples in the same order,
  `fraction` means the same thing, `set_epoch` rewinds exactly (resuming works), and DALI's own
  `shuffle_after_epoch` (a fixed internal seed) is not needed. The price is a new pipeline per
  pass over the data: 0.2 s on the embedded data set, 3 s for an ImageNet-size list (2 cores).
- Indices: the reader's label stream carries each sample's index in the sample list; the class
  label is looked up from it outside the pipeline, so validation can find each image's boxes.
- Training: shorter side to S, a uniformly random S x S crop, a horizontal flip with p = 0.5,
  as in `ImageDataset`. The crop corner is drawn as an integer as there, then handed to
  `crop_mirror_normalize` as `corner / (side - S)`, which DALI rounds back to that integer.
  The random draws come from DALI's generator seeded by (seed, epoch): the same distribution
  as the torch loader, not the same crops. `decoders.image_random_crop` is not used: it does
  the Inception random-resized crop (area and aspect jitter), which `ImageDataset` does not.
- Validation: shorter side to S and the centre crop (corner `(side - S) // 2`, as in
  `transforms.center_crop`), or both sides to S for the "stretch" policy; file order, no shuffle.
- Resizing: DALI's antialiased linear filter instead of OpenCV's area filter when shrinking,
  and DALI's JPEG decoder (libjpeg-turbo / nvJPEG) instead of OpenCV's: pixels differ by about
  half a grey level on average (tests/data/test_dali.py bounds it at 2/255).
- Sharding: the reader's `shard_id` / `num_shards` split the epoch list into contiguous blocks
  (`order.shard_bounds`, which the torch loader uses too). In training the list is cut to a
  multiple of `num_shards`, so every process gets as many batches (DDP needs that) and the last
  partial batch is dropped (`LastBatchPolicy.DROP`, the torch loader's `drop_last`). In
  validation the last batch is padded by the reader and trimmed by the iterator
  (`pad_last_batch` + `LastBatchPolicy.PARTIAL`), so each image is seen exactly once.
- Bad files: a file DALI cannot decode fails the whole pipeline, with a message that does not
  name it; the loader finds it (OpenCV decodes the failing batch's files again) and raises a
  one-line UserError naming it. It cannot skip one: `--skip-bad-images` takes the torch loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from casm_deploy.data.decode import decode_image
from casm_deploy.data.order import epoch_order, shard_bounds
from casm_deploy.data.transforms import RRC_RATIO, RRC_SCALE, validation_policy
from casm_deploy.errors import UserError


def dali_available() -> bool:
    """True when `nvidia.dali` and its PyTorch plugin import on this machine."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except (ImportError, OSError):  # OSError: a CUDA library the wheel needs is missing
        return False
    return True


def resolve_dali_device(device: str) -> int | None:
    """The CUDA device id DALI decodes on for `device` (cpu, auto, cuda, cuda:N), or None.

    None means CPU-only DALI: no GPU operator in the pipeline. Plain `cuda` is the current
    CUDA device, which a multi-process run sets to its local rank.

    Raises:
        UserError: CUDA is asked for and PyTorch finds none.
    """
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return None
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    index = torch.device("cuda" if device == "auto" else device).index
    return torch.cuda.current_device() if index is None else index


class DALILoader:
    """Iterates `(images, labels, indices)` batches through a DALI pipeline.

    Images are (B, 3, S, S), float32 (or `dtype`) in [0, 1], an NCHW view of NHWC data, so
    channels-last without a copy; on the GPU when `device` is CUDA, and the int64 labels with
    them. Indices (int64, into `samples`) stay on the CPU.

    Args:
        samples: `(path, label)` pairs, as `imagenet.list_images` returns them.
        size: the side S of the square images.
        batch_size: images per batch (per process when sharded).
        train: random crop (or RandomResizedCrop) and flip, shuffled, last partial batch
            dropped; else the validation transform in file order, every image once.
        workers: DALI CPU threads.
        seed: seeds the shuffle (with the epoch) and the augmentations.
        fraction: the share of the training set each epoch sees.
        policy: "center-crop", "stretch" (validation only) or "random-resized-crop" (training;
            its validation images take the centre crop).
        crop_scale: the smallest area share of random-resized-crop's windows.
        shard_id: this process's shard (global rank).
        num_shards: the number of shards (world size).
        device: "cpu", "auto", "cuda" or "cuda:N": where to decode and augment.
        dtype: torch.float32, or torch.float16 on CUDA (for fp16 mixed-precision training).
    """

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        size: int,
        batch_size: int,
        *,
        train: bool,
        workers: int = 1,
        seed: int = 0,
        fraction: float = 1.0,
        policy: str = "center-crop",
        crop_scale: float = RRC_SCALE[0],
        shard_id: int = 0,
        num_shards: int = 1,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if not 0 <= shard_id < num_shards:
            raise UserError(f"shard {shard_id} of {num_shards}: need 0 <= shard_id < num_shards")
        if dtype not in (torch.float32, torch.float16):
            raise UserError(f"DALI loader dtype {dtype}: use torch.float32 or torch.float16")
        self.samples, self.size, self.batch_size, self.train = samples, size, batch_size, train
        self.workers, self.seed, self.fraction = max(1, workers), seed, fraction
        self.crop_scale = crop_scale
        rrc = train and policy == "random-resized-crop"
        self.policy = policy if rrc else validation_policy(policy)
        if train and self.policy == "stretch":  # the training pipeline always crops and flips
            raise UserError("the DALI loader cannot train with the stretch policy")
        self.shard_id, self.num_shards = shard_id, num_shards
        self.device_id = resolve_dali_device(device)
        self.dtype = dtype
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self) -> list[int]:
        """This epoch's sample indices over all shards, exactly as the torch loader has them."""
        return epoch_order(
            len(self.samples),
            shuffle=self.train,
            seed=self.seed,
            epoch=self.epoch,
            fraction=self.fraction,
            multiple=self.num_shards if self.train else 1,
        )

    def __len__(self) -> int:
        start, end = shard_bounds(len(self.epoch_order()), self.shard_id, self.num_shards)
        n = end - start
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        order = self.epoch_order()
        pipe = self.pipeline(order)
        batches = DALIGenericIterator(
            [pipe],
            ["images", "indices"],
            reader_name="Reader",
            # DROP: the torch loader's drop_last; PARTIAL: the padding never leaves the iterator
            last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL,
            auto_reset=False,
        )
        done = 0  # batches handed out
        while True:
            try:
                (batch,) = next(batches)
            except StopIteration:
                return
            except RuntimeError as error:
                if "decoders.image" not in str(error):
                    raise
                raise self.decode_error(order, done, error) from None
            done += 1
            images = batch["images"].permute(0, 3, 1, 2)  # (B, S, S, 3) -> (B, 3, S, S) view
            indices = batch["indices"].view(-1).long()  # (B, 1) int32 -> (B,)
            labels = self.labels[indices]
            if images.is_cuda:  # beside the images, from pinned memory, without blocking
                labels = labels.pin_memory().to(images.device, non_blocking=True)
            yield images, labels, indices

    def decode_error(self, order: list[int], done: int, error: RuntimeError) -> UserError:
        """A one-line UserError for DALI's failure to decode a batch after `done` batches.

        DALI's message (many lines) does not name the file: the files of the failing batch and
        of those it may have prefetched are decoded again with OpenCV to find it.
        """
        start, end = shard_bounds(len(order), self.shard_id, self.num_shards)
        first = start + done * self.batch_size
        for i in order[first : min(end, first + 3 * self.batch_size)]:  # prefetch depth 2
            try:
                decode_image(self.samples[i][0])
            except UserError as bad:
                return bad
        lines = [line.strip() for line in str(error).splitlines() if "failure" in line]
        reason = f" ({lines[0]})" if lines else ""
        return UserError(
            f"DALI cannot decode an image of batch {done + 1} of this pass{reason}; "
            "--loader torch names the file"
        )

    def pipeline(self, order: list[int]):
        """A built DALI pipeline that reads `order` (this process's shard of it) once."""
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        gpu = self.device_id is not None
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.workers,
            device_id=self.device_id,  # None: a CPU-only pipeline
            seed=self.seed * 100_003 + self.epoch,  # as the torch loader's shuffle generator
            prefetch_queue_depth=2,
            exec_dynamic=True,  # lets the CPU crop arithmetic read the GPU images' shapes
        )
        size = self.size
        with pipe:
            jpegs, indices = fn.readers.file(
                files=[str(self.samples[i][0]) for i in order],
                labels=order,  # the label stream carries the sample index
                random_shuffle=False,  # `order` is already this epoch's shuffle
                shard_id=self.shard_id,
                num_shards=self.num_shards,
                stick_to_shard=True,
                pad_last_batch=True,
                name="Reader",
            )
            images = fn.decoders.image(
                jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB
            )
            if not self.train and self.policy == "stretch":
                images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
                crop = {}
            elif self.train and self.policy == "random-resized-crop":
                images = fn.random_resized_crop(
                    images,
                    size=(size, size),
                    random_area=[self.crop_scale, 1.0],
                    random_aspect_ratio=list(RRC_RATIO),
                    antialias=True,
                )
                crop = {}
            else:
                images = fn.resize(images, resize_shorter=size, antialias=True)
                crop = {"crop": (size, size), **self.crop_positions(images.shape())}
            images = fn.crop_mirror_normalize(
                images,
                mirror=fn.random.coin_flip(probability=0.5) if self.train else 0,
                mean=[0.0],  # [0, 255] -> [0, 1]; the SaliencyModel normalises
                std=[255.0],
                dtype=types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT,
                output_layout="HWC",
                **crop,
            )
            pipe.set_outputs(images, indices)
        pipe.build()
        return pipe

    def crop_positions(self, shape) -> dict:
        """`crop_pos_x` / `crop_pos_y` that put the S x S crop where `ImageDataset` puts it.

        `shape` is the resized images' (H, W, C). DALI places the corner at
        `round(pos * (side - S))`, so `pos = corner / (side - S)` gives back the integer corner
        (any pos works when side == S).
        """
        import nvidia.dali.math as dmath
        from nvidia.dali import fn

        positions = {}
        for name, side in (("crop_pos_y", shape[0]), ("crop_pos_x", shape[1])):
            free = side - self.size  # the number of corner positions, minus one
            if self.train:  # uniform over 0..free, as rng.integers(0, free + 1)
                corner = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (free + 1))
                corner = dmath.min(corner, free)  # uniform may return 1.0 itself
            else:  # transforms.center_crop
                corner = free // 2
            positions[name] = corner / dmath.max(free, 1)
        return positions


class JpegDecoder:
    """`infer`'s JPEG decoder: encoded files -> (N, S, S, 3) uint8 RGB, the whole image resized
    (no crop), with nvJPEG on a GPU (`mixed`) or DALI's CPU decoder without one.

    On a GPU the images stay there: a torch tensor on the device, copied out of DALI's output
    on a stream of its own and finished before it is returned (DALI reuses its output buffer
    on the next run); the model's side records its stream on it (`device_io.DeviceIO`). On
    the CPU a numpy array. The EXIF orientation is applied, as OpenCV does.
    """

    def __init__(self, size: int, batch_size: int, device_id: int | None, threads: int):
        from nvidia.dali import fn, pipeline_def, types

        self.device_id = device_id
        self.name = "DALI, cpu" if device_id is None else f"DALI nvJPEG, cuda:{device_id}"
        decoder_device = "cpu" if device_id is None else "mixed"
        self.stream = None if device_id is None else torch.cuda.Stream(f"cuda:{device_id}")

        @pipeline_def(
            batch_size=batch_size,
            num_threads=threads,
            device_id=device_id,
            prefetch_queue_depth=1,  # fed one batch at a time (external_source)
        )
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
            return fn.resize(images, resize_x=size, resize_y=size, antialias=True)

        self.pipeline = pipeline()
        self.pipeline.build()

    def accepts(self, encoded) -> bool:
        """Every JPEG (an `imagefiles.Encoded`): DALI converts CMYK and grey itself."""
        return encoded.is_jpeg

    def __call__(self, files: list) -> np.ndarray | torch.Tensor:
        """Decode up to `batch_size` JPEGs (`imagefiles.Encoded`); raises if DALI cannot decode
        one of them."""
        self.pipeline.feed_input("encoded", [f.data for f in files])
        (images,) = self.pipeline.run()
        if self.stream is None:
            return images.as_array()  # (N, S, S, 3)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = images.as_tensor()
        with torch.cuda.stream(self.stream):
            out = torch.empty(tensor.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
            feed_ndarray(tensor, out, cuda_stream=self.stream)
        self.stream.synchronize()
        return out
