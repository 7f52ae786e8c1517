"""Ten-crop evaluation (Krizhevsky et al. 2012, section 4.1) as a DALI graph and a val loader.

"At test time, the network makes a prediction by extracting five 224 x 224 patches (the four
corner patches and the center patch) as well as their horizontal reflections (hence ten patches in
all), and averaging the predictions made by the network's softmax layer on the ten patches."
The patches come from the 256 x 256 image of section 2 (shorter side rescaled to 256, central
square), so the graph is: decode -> resize shorter side -> central square -> five crops, each with
its mirror. Every sample becomes a [10, 3, crop, crop] tensor; a batch is [B, 10, 3, crop, crop].
`alexnet.evaluate.eval_batch` averages the softmax over the ten.

`ten_crop_reference` is the same computation in plain torch on the decoded square, used by the
tests to pin the graph's numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from nvidia.dali import fn, pipeline_def, types

from pipelines.base import ImageSpec, ShardSpec
from pipelines.dali import DaliLoader, DecoderDevice, decoder_args, headers_checked
from pipelines.index import FileIndex

READER_NAME = "TenCropReader"
# (crop_pos_x, crop_pos_y) in DALI's normalized window positions: top-left, top-right,
# bottom-left, bottom-right, centre (torchvision's TenCrop order); then the same five mirrored.
POSITIONS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))


@pipeline_def
def ten_crop_graph(
    files: list[str],
    labels: list[int],
    image: ImageSpec,
    shard: ShardSpec,
    decoder: str,
    hw_decoder_load: float,
    layout: str,
    with_square: bool = False,
):
    jpegs, label = fn.readers.file(
        files=files,
        labels=labels,
        shard_id=shard.shard_id,
        num_shards=shard.num_shards,
        pad_last_batch=True,
        stick_to_shard=True,
        name=READER_NAME,
    )
    square = fn.decoders.image(headers_checked(jpegs), **decoder_args(decoder, hw_decoder_load))
    # subpixel_scale=False: each axis scaled by output / input size, as in the val graph (pipelines/dali.py)
    square = fn.resize(square, resize_shorter=image.resize, subpixel_scale=False)
    square = fn.crop(square, crop=(image.resize, image.resize))
    normalize: dict[str, Any] = {
        "crop": (image.crop, image.crop),
        "dtype": types.FLOAT,
        "output_layout": layout,
        "mean": list(image.mean),
        "std": list(image.std),
    }
    crops = [
        fn.crop_mirror_normalize(square, crop_pos_x=x, crop_pos_y=y, mirror=mirror, **normalize)
        for mirror in (0, 1)
        for x, y in POSITIONS
    ]
    stacked = fn.stack(*crops)  # [10, C, H, W] (or [10, H, W, C]) per sample
    if with_square:
        return stacked, label, square
    return stacked, label


def crop_offsets(size: int, crop: int) -> list[tuple[int, int]]:
    """(top, left) of the five windows in a size x size square, rounded as DALI rounds
    (`rounding="round"`: half a pixel rounds up for the centre)."""
    far = size - crop
    centre = int(far * 0.5 + 0.5)
    return [(0, 0), (0, far), (far, 0), (far, far), (centre, centre)]


def ten_crop_reference(
    square: torch.Tensor, crop: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Plain-torch ten-crop of one decoded uint8 HWC square: [10, 3, crop, crop] float32."""
    x = square.permute(2, 0, 1).to(torch.float32)
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"ten_crop_reference expects a square image, got {tuple(square.shape)}")
    windows = [x[:, t : t + crop, s : s + crop] for t, s in crop_offsets(x.shape[1], crop)]
    windows += [w.flip(-1) for w in windows]
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    inv_std = 1.0 / torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return torch.stack([(w - m) * inv_std for w in windows])


class TenCropLoader(DaliLoader):
    """The validation side of the Loader protocol over `ten_crop_graph`.

    DaliLoader's val split with another graph: padded, sticky shards by the data-parallel rank,
    `val_steps` batches on every rank, PAD_LABEL on rows that only pad a shard.
    Yields images [B, 10, 3, crop, crop] and labels [B].
    """

    def __init__(
        self,
        index: FileIndex,
        image: ImageSpec,
        shard: ShardSpec,
        device: torch.device,
        num_threads: int,
        prefetch: int,
        decoder: DecoderDevice,
        hw_decoder_load: float = 0.65,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            index, "val", image, shard, device, num_threads, prefetch, decoder, hw_decoder_load, channels_last
        )

    def _graph(self, **common: Any):
        return ten_crop_graph(seed=self._shard.seed, **common)

    @staticmethod
    def _nchw_view(images: torch.Tensor) -> torch.Tensor:
        # [B, 10, H, W, C] storage seen as [B, 10, C, H, W]: flattening the crops into the batch
        # keeps channels_last strides.
        return images.permute(0, 1, 4, 2, 3)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "pos": 0}  # validation always runs whole epochs

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch = int(state.get("epoch", 0))
