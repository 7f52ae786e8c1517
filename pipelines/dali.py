"""NVIDIA DALI input pipeline: one graph; the decoder's device is the only GPU/CPU difference.

Sharding follows the data-parallel rank (`ShardSpec.shard_id`), never LOCAL_RANK. Training reads
a fresh global permutation every epoch (`shuffle_after_epoch`: the same permutation on every rank,
so the shards of one epoch are disjoint and cover the data); validation reads fixed contiguous
shards (`stick_to_shard`) in file order. `pad_last_batch` makes every shard the same number of
batches, so no rank waits for another at a collective.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.backend import TensorGPU
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

from pipelines.base import PAD_LABEL, ImageSpec, ShardSpec, Split, position_state, shard_bounds, train_steps, val_steps
from pipelines.index import FileIndex
from pipelines.lighting import Lighting, with_lighting

log = logging.getLogger("alexnet")

READER_NAME = "Reader"
DecoderDevice = Literal["mixed", "cpu"]


@pipeline_def
def image_graph(
    files: list[str],
    labels: list[int],
    image: ImageSpec,
    shard: ShardSpec,
    training: bool,
    decoder: DecoderDevice,
    hw_decoder_load: float,
    layout: str,
    lighting: Lighting | None = None,
):
    jpegs, label = fn.readers.file(
        files=files,
        labels=labels,
        shard_id=shard.shard_id,
        num_shards=shard.num_shards,
        pad_last_batch=True,
        shuffle_after_epoch=training,
        stick_to_shard=not training,
        name=READER_NAME,
    )
    decode = decoder_args(decoder, hw_decoder_load)
    if training and image.train_crop == "random_resized":
        # Inception-style crop (Szegedy et al. 2015): decode only the sampled window.
        images = fn.decoders.image_random_crop(
            headers_checked(jpegs), random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3), num_attempts=10,
            **decode,
        )  # fmt: skip
        images = mirror_normalize(resize_patch(images, image), image, layout, lighting)
    elif training:
        images = mirror_normalize(paper_random_crop(jpegs, image, decode), image, layout, lighting)
    else:
        images = fn.decoders.image(headers_checked(jpegs), **decode)
        # subpixel_scale=False: each axis is scaled by its rounded output size over its input size,
        # as PIL and torch do (and the exports' preprocessing says). DALI's default keeps the exact
        # factor resize / shorter side on the longer axis too, so its samples drift by up to half
        # a source pixel across the rounded width: a mean |diff| of 3.7 levels against the torchvision
        # pipeline on a textured 500x375 image, 0.2 with this.
        images = fn.resize(images, resize_shorter=image.resize, subpixel_scale=False)
        images = fn.crop_mirror_normalize(images, crop=(image.crop, image.crop), **normalize_args(image, layout))
    return images, label


def normalize_args(image: ImageSpec, layout: str, dtype: Any = types.FLOAT) -> dict[str, Any]:
    """`fn.crop_mirror_normalize`'s per-channel normalization to `dtype` in `layout`. float32 by
    default: DALI's CPU conversion to float16 is slower than to float32 (the `--stages` rows of
    `benchmark.py pipeline`), and a uint8 output normalised by torch gains nothing on the CPU."""
    return {"dtype": dtype, "output_layout": layout, "mean": list(image.mean), "std": list(image.std)}


def mirror_normalize(patch, image: ImageSpec, layout: str, lighting: Lighting | None = None, dtype: Any = types.FLOAT):
    """Section 4.1: the patch reflected horizontally at random, then normalised; the PCA lighting
    (when on) is folded into the mean that the normalization subtracts."""
    normalize = with_lighting(normalize_args(image, layout, dtype), lighting)
    return fn.crop_mirror_normalize(patch, mirror=fn.random.coin_flip(probability=0.5), **normalize)


# EXIF orientation is ignored, as PIL's Image.open (torchvision's ImageFolder) ignores it: DALI
# rotates by default, and the two pipelines (and the published ImageNet numbers, all PIL-decoded)
# would see a tagged photo rotated by 90 degrees against each other.
ADJUST_ORIENTATION = False


def decoder_args(decoder: DecoderDevice, hw_decoder_load: float) -> dict[str, Any]:
    """The decoder operator's arguments: RGB output, the stored orientation, and the hardware
    decoder's share on GPUs."""
    decode: dict[str, Any] = {"device": decoder, "output_type": types.RGB, "adjust_orientation": ADJUST_ORIENTATION}
    if decoder == "mixed":
        decode["hw_decoder_load"] = hw_decoder_load
    return decode


def headers_checked(jpegs):
    """The encoded files, passed to a decoder only once every header of the batch has parsed.

    DALI 2.4's image decoders parse a batch's headers in blocks on several threads; a header that
    fails (a file that is no image: random bytes, text, a JPEG cut inside its header) can end
    the batch while another thread still works on it, on freed memory: the process died of
    SIGSEGV with no message in about half the tries at batch 64 with 2 threads, and in some at
    batch 32 (pipelines.filecheck names the file once DALI's error is an exception).
    fn.peek_image_shape parses each header on its own and fails cleanly, and a decoder that
    depends on its output does not run on that batch. The reshape leaves the bytes as they are
    (no copy; DALI's errors still name the file), only to carry that dependency. The header is
    parsed twice; the validation graph ran 0.92-1.10x as fast as without (README, "Bad data")."""
    shape = fn.peek_image_shape(jpegs, dtype=types.INT64, adjust_orientation=ADJUST_ORIENTATION)
    return fn.reshape(jpegs, shape=jpegs.shape(dtype=types.INT64) + shape[0] * 0)


def paper_random_crop(jpegs, image: ImageSpec, decode: dict[str, Any]):
    """Sections 2 and 4.1: shorter side scaled to `resize`, the central resize x resize square,
    a random crop x crop patch of it; done in the original image's coordinates, so that only the
    patch is decoded (libjpeg-turbo and nvJPEG skip the rest) and only the patch is resized."""
    return resize_patch(decode_paper_window(jpegs, image, decode), image)


def decode_paper_window(jpegs, image: ImageSpec, decode: dict[str, Any]):
    """The random patch of `paper_random_crop`, decoded at the original resolution.

    The patch spans side * crop / resize original pixels (side = the shorter side) and is scaled
    by resize / side, as the resize-then-crop order would; the two orders differ only in how the
    resampling filter treats the patch's border. The decoder depends on the header's shape, so a
    header that does not parse stops the batch before it (see `headers_checked`)."""
    # H, W, C from the header alone, in the decoder's (stored) orientation
    shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT, adjust_orientation=ADJUST_ORIENTATION)
    height, width = shape[0], shape[1]
    side = dmath.min(height, width)
    window = side * (image.crop / image.resize)
    x0 = (width - side) * 0.5 + fn.random.uniform(range=(0.0, 1.0)) * (side - window)
    y0 = (height - side) * 0.5 + fn.random.uniform(range=(0.0, 1.0)) * (side - window)
    return fn.decoders.image_slice(
        jpegs,
        fn.stack(y0, x0),
        fn.stack(window, window),
        axis_names="HW",
        normalized_anchor=False,
        normalized_shape=False,
        **decode,
    )


def resize_patch(patch, image: ImageSpec):
    """The decoded patch scaled to the network's crop x crop input."""
    return fn.resize(patch, resize_x=image.crop, resize_y=image.crop)


def to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """Copy a DALI batch into a new torch tensor (DALI reuses its buffers): GPU outputs on
    `device` in the current stream, CPU outputs on the CPU, in pinned memory when `device` is a
    GPU (the CPU decoder on a GPU machine), so that the copy to it can be asynchronous."""
    tensor = tensor_list.as_tensor()
    on_gpu = isinstance(tensor, TensorGPU)
    where = {"device": device} if on_gpu else {"device": "cpu", "pin_memory": device.type == "cuda"}
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], **where)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device) if on_gpu else None)
    return out


def run_checked(pipe, files: list[str]):
    """pipe.run(); a file the decoder cannot read becomes a DataError naming it (DALI cannot drop
    a bad sample, and its own message names the file only for some failures)."""
    try:
        return pipe.run()
    except RuntimeError as exc:
        from pipelines.filecheck import explain_decode_failure

        error = explain_decode_failure(str(exc), files)
        if error is None:
            raise
        raise error from exc


# Steps the seeds of the reader's order and of the augmentation by the loader epoch a fresh
# pipeline starts at (a large odd number: no nearby data.seed, shard or epoch gives another's).
_EPOCH_SEED_STRIDE = 998_244_353


class DaliLoader:
    """The Loader protocol over a DALI pipeline, built once and reused every epoch (rebuilding
    pipelines leaks their memory pools)."""

    # A position converted to another layout starts a fresh reader, whose epoch order is its own.
    keeps_epoch_order = False

    def __init__(
        self,
        index: FileIndex,
        split: Split,
        image: ImageSpec,
        shard: ShardSpec,
        device: torch.device,
        num_threads: int,
        prefetch: int,
        decoder: DecoderDevice,
        hw_decoder_load: float = 0.65,
        channels_last: bool = False,
        lighting: Lighting | None = None,
    ) -> None:
        if decoder == "mixed" and device.type != "cuda":
            raise ValueError("data.decoder=mixed needs a CUDA device; use data.decoder=cpu or auto")
        self.split = split
        self.num_samples = len(index)
        self._index = index
        self._image = image
        self._shard = shard
        self._device = device
        self._num_threads = num_threads
        self._prefetch = prefetch
        self._decoder = decoder
        self._hw_decoder_load = hw_decoder_load
        self._channels_last = channels_last
        self._lighting = lighting if split == "train" else None
        n, k, b = len(index), shard.num_shards, shard.batch_size
        # Batches in one pass of the reader over a padded shard; training uses only the whole
        # batches of real samples and skips the rest.
        self._reader_batches = val_steps(n, k, b)
        self._steps = train_steps(n, k, b, shard.batches_per_step) if split == "train" else self._reader_batches
        start, end = shard_bounds(n, shard.shard_id, k)
        self._real_in_shard = end - start
        self._pipe = None
        self._restore: str | None = None
        self._epoch = 0
        self._pos = 0
        # The loader epoch the pipeline's reader starts at: its order and the augmentation's seed
        # derive from it (_reader_order, _graph). A fresh pipeline built at epoch e > 0 (a resume
        # without a DALI checkpoint: another layout or batch, another graph) replayed epoch 0's
        # images, crops, flips and lighting, then epoch 1's, bit for bit. A restored DALI
        # checkpoint needs the graph it was written by: the epoch its pipeline was built at.
        self._reader_epoch = 0
        # True while the pipeline to be built starts its reader at the top of an epoch although
        # `_pos` batches of the loader's epoch are done (a state without a DALI checkpoint).
        self._reader_behind = False

    def __len__(self) -> int:
        return self._steps

    def _build(self):
        if self._pipe is None:
            try:
                self._pipe = self._built_graph()
            except RuntimeError as exc:
                if self._restore is None or "checkpoint" not in str(exc).lower():
                    raise
                # A checkpoint of another graph: written with another data.lighting_std or
                # data.train_crop, say. DALI refuses it; the run goes on as after a change of
                # layout, with a fresh reader caught up to the position.
                log.warning(
                    "the DALI checkpoint in the resumed state belongs to another training graph (%s); "
                    "the interrupted epoch goes on from step %d with a fresh reader, its order not replayed",
                    str(exc).strip().splitlines()[-1][:200], self._pos,
                )  # fmt: skip
                self._restore = None
                self._reader_epoch = self._epoch
                self._reader_behind = self._pos > 0
                self._pipe = self._built_graph()
        return self._pipe

    def _built_graph(self):
        reader = self._reader_order(self._reader_epoch)
        pipe = self._graph(
            files=reader.files,
            labels=reader.labels,
            image=self._image,
            shard=self._shard,
            decoder=self._decoder,
            hw_decoder_load=self._hw_decoder_load,
            layout="HWC" if self._channels_last else "CHW",
            batch_size=self._shard.batch_size,
            num_threads=self._num_threads,
            device_id=self._device.index if self._device.type == "cuda" else None,
            prefetch_queue_depth=self._prefetch,
        )
        pipe.build()
        return pipe

    def _reader_order(self, epoch: int) -> FileIndex:
        """The files in the order a reader started at loader epoch `epoch` gets them. Training:
        permuted by data.seed, the same permutation on every rank (each epoch's shards stay
        disjoint), and by the epoch where it is not 0. DALI's shuffle_after_epoch draws its
        permutations from a seed of its own that no pipeline or reader seed reaches, so without
        this every data.seed would train on the same batches in the same order."""
        if self.split != "train":
            return self._index  # validation reads fixed shards in file order
        generator = torch.Generator().manual_seed(self._shard.seed + epoch * _EPOCH_SEED_STRIDE)
        return self._index.subset(torch.randperm(len(self._index), generator=generator).tolist())

    def _graph(self, **common: Any):
        """The DALI graph this loader runs; `common` holds what every graph of the project takes."""
        training = self.split == "train"
        # The reader's shuffle is shared by all ranks; augmentation differs per shard, and per
        # reader start (0 for a run that never rebuilt its pipeline: its seeds as before).
        aug_seed = self._shard.seed * 1_000_003 + self._shard.shard_id * 2 + int(training)
        aug_seed = (aug_seed + self._reader_epoch * _EPOCH_SEED_STRIDE) % (2**31)
        return image_graph(
            training=training,
            lighting=self._lighting,
            seed=aug_seed,
            enable_checkpointing=True,
            checkpoint=self._restore,
            **common,
        )

    @staticmethod
    def _nchw_view(images: torch.Tensor) -> torch.Tensor:
        return images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: channels_last

    def _run_pipeline(self):
        return run_checked(self._pipe, self._index.files)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images_tl, labels_tl = self._run_pipeline()
        images = to_torch(images_tl, self._device)
        labels = to_torch(labels_tl, self._device).reshape(-1).to(torch.int64)
        if self.split == "val":
            first = self._pos * self._shard.batch_size
            row = torch.arange(first, first + labels.shape[0])
            labels[row >= self._real_in_shard] = PAD_LABEL
        if self._channels_last:
            images = self._nchw_view(images)
        return images.to(self._device, non_blocking=True), labels.to(self._device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._build()
        if self._reader_behind and not self._catch_up_reader():
            self._end_epoch()
            return
        while self._pos < self._steps:
            batch = self._next_batch()
            self._pos += 1
            yield batch
        for _ in range(self._reader_batches - self._steps):
            self._run_pipeline()  # the padded tail of the shard: keeps every rank's reader in step
        self._end_epoch()

    def _end_epoch(self) -> None:
        self._pos = 0
        self._epoch += 1

    def _catch_up_reader(self) -> bool:
        """Move a fresh reader to the loader's position; False when the epoch has nothing left.

        Running the graph is the only way to move a DALI reader (it has no seek), so the first
        `_pos` batches of the reader's epoch are decoded and dropped: a one-off cost on a resume
        without a DALI checkpoint. Without it the reader's epochs would stay `_pos` batches out of
        step with the loader's, and every later epoch would repeat some samples and miss others.
        A finished epoch needs nothing: the fresh reader already stands at the top of the next."""
        self._reader_behind = False
        if self._pos >= self._steps:
            return False
        for _ in range(self._pos):
            self._run_pipeline()
        return True

    def state_dict(self) -> dict[str, Any]:
        state = position_state(self._epoch, self._pos, self._shard, self._steps, self._index)
        if self._pipe is not None:
            state["dali"] = self._pipe.checkpoint()
        elif self._restore is not None:
            state["dali"] = self._restore
        if "dali" in state:
            state["reader_epoch"] = self._reader_epoch  # the graph the DALI checkpoint belongs to
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._pipe is not None:
            raise RuntimeError("load_state_dict must come before the first epoch")
        self._epoch = int(state["epoch"])
        self._pos = int(state["pos"])
        self._restore = state.get("dali")
        # A DALI checkpoint goes back into the graph that wrote it (older states: built at epoch
        # 0); without one the pipeline starts fresh, its reader at the top of this epoch.
        self._reader_epoch = int(state.get("reader_epoch", 0)) if self._restore is not None else self._epoch
        self._reader_behind = self._restore is None and self._pos > 0

    def close(self) -> None:
        self._pipe = None
