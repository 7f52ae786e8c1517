"""DALI CPU pipeline against the torchvision pipeline, on real JPEG files."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from _helpers import dali_missing
from PIL import Image

from alexnet.config import ConfigError
from alexnet.data import split_folder
from pipelines.base import PAD_LABEL, ImageSpec, ShardSpec
from pipelines.index import DataError, build_file_index
from pipelines.synthetic import SyntheticLoader
from pipelines.torchvision_loader import TorchvisionLoader

if not dali_missing():  # for the tests marked dali (skipped where DALI is not installed)
    from pipelines.dali import DaliLoader, decode_paper_window, decoder_args

CPU = torch.device("cpu")
MEAN = (124.0, 116.0, 104.0)
STD = (58.0, 57.0, 57.0)


def spec(crop=67, resize=76, train_crop="paper"):
    return ImageSpec(crop, resize, train_crop, MEAN, STD)


def dali(index, split, batch=4, shard=0, shards=1, seed=0, image=None):
    return DaliLoader(index, split, image or spec(), ShardSpec(shard, shards, batch, seed), CPU, 1, 2, "cpu")


def tv(index, split, batch=4, shard=0, shards=1, seed=0, image=None, workers=0):
    return TorchvisionLoader(index, split, image or spec(), ShardSpec(shard, shards, batch, seed), CPU, workers, 2)


def photo_like_jpeg(path: Path, width=500, height=375, seed=0, orientation=None) -> None:
    """An ImageNet-sized JPEG (quality 90) with smooth regions, edges and noise; `orientation`:
    an EXIF Orientation tag (6: a camera held upright, "rotate 90 degrees to view")."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([128 + 60 * np.sin(xx / 40 + c) + 40 * np.cos(yy / 30 * (c + 1)) for c in range(3)], -1)
    for _ in range(30):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 60)
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[disk] = 0.5 * img[disk] + 0.5 * rng.uniform(0, 255, 3)
    img = (img + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(img).save(path, quality=90, exif=exif)


def test_file_index_matches_imagefolder(tiny_data):
    index = build_file_index(tiny_data / "train")
    folder = torchvision.datasets.ImageFolder(str(tiny_data / "train"))
    assert index.classes == folder.classes
    assert list(zip(index.files, index.labels)) == [(p, y) for p, y in folder.samples]


@pytest.mark.dali
def test_dali_cpu_batches_shapes_dtype_and_labels(tiny_data):
    index = build_file_index(tiny_data / "val")
    loader = dali(index, "val", batch=8)
    batches = list(loader)
    images, labels = batches[0]
    assert images.shape == (8, 3, 67, 67) and images.dtype == torch.float32 and images.device == CPU
    assert labels.dtype == torch.int64
    got = torch.cat([y for _, y in batches])
    got = got[got != PAD_LABEL]
    # files in index order on one shard: labels equal ImageFolder's class indices file by file
    folder = torchvision.datasets.ImageFolder(str(tiny_data / "val"))
    assert got.tolist() == [y for _, y in folder.samples]
    # normalized with this mean and std: undone, the values are 8-bit pixels again (a missing
    # mean subtraction or division puts them far outside 0..255)
    pixels = images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert -0.01 < pixels.min().item() and pixels.max().item() < 255.01 and pixels.std().item() > 10
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)  # whole 8-bit values, normalised once


@pytest.mark.dali
@pytest.mark.parametrize("orientation", [None, 6])
def test_dali_val_matches_torchvision_on_a_real_jpeg(tmp_path, orientation):
    """Both decode with libjpeg-turbo (bit-identical pixels, asserted below); they differ only in
    the resampling filter of the resize (DALI's antialiased linear vs PIL's bilinear) and where
    each rounds to 8 bits. Tolerance in 0-255 pixel units: mean |diff| < 0.75, 99th percentile
    < 3. A one-pixel shift of the crop gives a mean of about 3.5, so alignment errors fail.
    With an EXIF orientation tag both keep the stored orientation, as PIL does."""
    for name in ("a", "b"):
        photo_like_jpeg(tmp_path / "val" / name / "x.jpg", orientation=orientation)
    index = build_file_index(tmp_path / "val")
    image = spec(crop=227, resize=256)
    d_images, d_labels = next(iter(dali(index, "val", batch=2, image=image)))
    t_images, t_labels = next(iter(tv(index, "val", batch=2, image=image)))
    assert torch.equal(d_labels, t_labels)
    diff = (d_images - t_images).abs() * torch.tensor(STD).view(1, 3, 1, 1)
    assert diff.mean().item() < 0.75
    assert torch.quantile(diff.flatten(), 0.99).item() < 3.0

    from nvidia.dali import fn, pipeline_def

    @pipeline_def
    def decode_only():
        jpegs, _ = fn.readers.file(files=index.files[:1])
        return fn.decoders.image(jpegs, **decoder_args("cpu", 0.0))

    pipe = decode_only(batch_size=1, num_threads=1, device_id=None)
    pipe.build()
    dali_pixels = np.array(pipe.run()[0].as_tensor())[0]
    pil_pixels = np.asarray(Image.open(index.files[0]).convert("RGB"))
    assert np.array_equal(dali_pixels, pil_pixels)


@pytest.mark.dali
@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (200, 281)])
def test_dali_val_resize_samples_where_pil_does_on_a_fine_texture(tmp_path, height, width):
    """Pixel noise shows where each pipeline samples the source. Both scale each axis by its
    rounded output size over its input size (the exports' preprocessing too). DALI's default
    (subpixel_scale) kept the exact factor on the longer axis, so its samples drifted across the
    rounded width: in these central crops a mean |diff| of 1.75-1.84 levels, against 0.16-0.20
    (at most 1 level) aligned."""
    rng = np.random.default_rng(height + width)
    for name in ("a", "b"):
        path = tmp_path / "val" / name / "x.jpg"
        path.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=95)
    index = build_file_index(tmp_path / "val")
    image = spec(crop=227, resize=256)
    d_images, _ = next(iter(dali(index, "val", batch=2, image=image)))
    t_images, _ = next(iter(tv(index, "val", batch=2, image=image)))
    diff = (d_images - t_images).abs() * torch.tensor(STD).view(1, 3, 1, 1)
    assert diff.mean().item() < 0.5
    assert torch.quantile(diff.flatten(), 0.99).item() < 1.5


@pytest.mark.dali
def test_dali_train_window_is_taken_in_the_stored_orientation(tmp_path):
    """The paper crop's window is placed from the header's shape and decoded; both must read the
    file as stored (with crop = resize the window is the central square, as PIL sees it)."""
    from nvidia.dali import fn, pipeline_def

    path = tmp_path / "x.jpg"
    photo_like_jpeg(path, orientation=6)

    @pipeline_def
    def window():
        jpegs, _ = fn.readers.file(files=[str(path)])
        return decode_paper_window(jpegs, spec(crop=256, resize=256), decoder_args("cpu", 0.0))

    pipe = window(batch_size=1, num_threads=1, device_id=None, seed=0)
    pipe.build()
    got = np.array(pipe.run()[0].as_tensor())[0].astype(np.float32)
    pil = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)  # 375 x 500, not rotated
    assert got.shape == (375, 375, 3)
    # the central square (its left edge at 62.5: DALI rounds the anchor), decoded as a window
    assert min(np.abs(got - pil[:, x : x + 375]).mean() for x in (62, 63)) < 1.0


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
def test_train_augmentation_varies_and_is_reproducible(tiny_data, kind):
    index = build_file_index(tiny_data / "train")
    make = dali if kind == "dali" else tv
    first = [x for x, _ in make(index, "train", batch=8, seed=1)]
    again = [x for x, _ in make(index, "train", batch=8, seed=1)]
    other = [x for x, _ in make(index, "train", batch=8, seed=2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("kind", [pytest.param("dali", marks=pytest.mark.dali), "torchvision"])
def test_mid_epoch_resume_replays_the_same_batches(tiny_data, kind):
    index = build_file_index(tiny_data / "train")
    make = dali if kind == "dali" else tv
    straight = make(index, "train", batch=8, seed=5)
    expected = [(x.clone(), y.clone()) for epoch in range(2) for x, y in straight]
    interrupted = make(index, "train", batch=8, seed=5)
    it = iter(interrupted)
    head = [next(it) for _ in range(5)]
    state = interrupted.state_dict()
    assert state["pos"] == 5
    resumed = make(index, "train", batch=8, seed=5)
    resumed.load_state_dict(state)
    tail = list(resumed) + list(resumed)  # rest of epoch 1, then epoch 2
    got = head + tail
    assert len(got) == len(expected) == 2 * len(straight)
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(y, ey) and torch.equal(x, ex)


@pytest.mark.dali
def test_a_dali_checkpoint_of_another_graph_resumes_with_a_fresh_reader(tiny_data, caplog):
    """Resumed with data.lighting_std turned on, the saved DALI checkpoint names operators this
    graph lacks; DALI refuses it. The loader warns, catches a fresh reader up to the position
    instead, and the next epoch reads every file once."""
    from pipelines.lighting import IMAGENET_DEFAULT, Lighting

    index = build_file_index(tiny_data / "train")  # 120 files: 15 batches of 8
    interrupted = dali(index, "train", batch=8, seed=5)
    it = iter(interrupted)
    head = [next(it)[1] for _ in range(5)]
    state = interrupted.state_dict()
    assert state["dali"]
    resumed = DaliLoader(index, "train", spec(), ShardSpec(0, 1, 8, 5), CPU, 1, 2, "cpu",
                         lighting=Lighting(0.1, IMAGENET_DEFAULT))  # fmt: skip
    resumed.load_state_dict(state)
    rest = [y for _, y in resumed]
    assert "belongs to another training graph" in caplog.text
    assert len(head) + len(rest) == len(resumed) == 15
    assert sorted(int(v) for _, y in resumed for v in y) == sorted(index.labels)


@pytest.mark.dali
def test_a_fresh_dali_reader_at_a_later_epoch_does_not_replay_the_first_epochs(tiny_data):
    """A resume without a DALI checkpoint (another layout, batch or graph) builds a fresh pipeline
    at the saved epoch: its reader's order and its crops, flips and lighting came from seeds that
    did not depend on the epoch, so epochs 2 and 3 were epochs 0 and 1 again, bit for bit. Each
    later epoch still reads every file once, and a DALI checkpoint that such a pipeline writes
    goes back into the same graph (the epoch it started at is saved with it)."""
    index = build_file_index(tiny_data / "train")  # 120 files: 15 batches of 8
    straight = dali(index, "train", batch=8, seed=5)
    epochs = [[(x.clone(), y.clone()) for x, y in straight] for _ in range(2)]
    state = straight.state_dict()
    assert (state["epoch"], state["pos"], state["reader_epoch"]) == (2, 0, 0)
    del state["dali"], state["reader_epoch"]  # what a resume under another layout passes on
    fresh = dali(index, "train", batch=8, seed=5)
    fresh.load_state_dict(state)
    for epoch in range(2):
        got = list(fresh)
        assert sorted(int(v) for _, y in got for v in y) == sorted(index.labels)  # every file once
        assert not any(torch.equal(x, ex) for (x, _), (ex, _) in zip(got, epochs[epoch]))
        assert [y.tolist() for _, y in got] != [y.tolist() for _, y in epochs[epoch]]  # another order too
    it = iter(fresh)
    [next(it) for _ in range(3)]
    mid = fresh.state_dict()
    assert mid["reader_epoch"] == 2 and mid["dali"]
    rest = [(x.clone(), y.clone()) for x, y in it]
    restored = dali(index, "train", batch=8, seed=5)
    restored.load_state_dict(mid)
    again = list(restored)
    assert len(again) == len(rest) == 12
    assert all(torch.equal(x, ex) and torch.equal(y, ey) for (x, y), (ex, ey) in zip(again, rest))


def test_synthetic_loader_contract():
    loader = SyntheticLoader("train", 67, 10, ShardSpec(1, 2, 4, 0), steps=3, device=CPU)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert batches[0][0].shape == (4, 3, 67, 67) and batches[0][1].max() < 10
    assert loader.state_dict() == {"epoch": 1, "pos": 0, "num_shards": 2, "steps": 3, "batch_size": 4}
    assert loader.num_samples == 3 * 4 * 2


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_file_index(tmp_path / "nope")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"a_file \(config key 'data.root'\) is a file, not a folder"):
        split_folder(tmp_path / "a_file", "train")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="without images.*cat"):
        build_file_index(tmp_path / "train")


@pytest.mark.dali
def test_paper_crop_is_a_random_patch_of_the_central_square(tmp_path):
    """A 200x100 image whose red channel encodes x and green encodes y: with resize 50 and crop 40,
    every patch lies in the central 100x100 square, spans 80 original pixels (side * 40 / 50),
    and its position varies."""
    width, height = 200, 100
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    path = tmp_path / "train" / "a" / "ramp.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).round().astype(np.uint8)).save(path)
    index = build_file_index(tmp_path / "train")
    index = type(index)(index.files * 16, index.labels * 16, index.classes)
    image = ImageSpec(40, 50, "paper", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    (images, _), *_ = list(dali(index, "train", batch=16, image=image))
    px = 255 / (width - 1)  # red levels per original pixel
    starts = []
    for img in images:
        red = img[0].sort(dim=1).values  # per row; sorting undoes a mirror
        lo, hi = red[:, 2].mean().item(), red[:, -3].mean().item()  # inside the resampling border
        assert 50 * px - 3 <= lo and hi <= 150 * px + 3  # within the central square x in [50, 150)
        assert (hi - lo) / px == pytest.approx(80 * 35 / 39, abs=3)  # 80 pixels, minus two border columns
        starts.append(lo)
    assert max(starts) - min(starts) > 5 * px  # random positions, not one fixed crop


@pytest.mark.dali  # both kinds: the test imports DaliLoader
@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_random_resized_crops_zoom_in_where_the_paper_crop_does_not(tmp_path, kind):
    """Images whose left half is black and right half white. The paper's crop (227/256 of the
    rescaled image's side, section 4.1) always spans both halves; the Inception-style crop (8% to
    100% of the area) often falls inside one half, so some patches come out a single colour."""
    from PIL import Image

    from pipelines.base import ImageSpec, ShardSpec
    from pipelines.dali import DaliLoader
    from pipelines.index import FileIndex
    from pipelines.torchvision_loader import TorchvisionLoader

    folder = tmp_path / "halves"
    folder.mkdir()
    half = np.zeros((96, 128, 3), dtype=np.uint8)
    half[:, 64:] = 255
    files = []
    for i in range(16):
        files.append(str(folder / f"{i}.png"))
        Image.fromarray(half).save(files[-1])
    index = FileIndex(files, [0] * 16, ["halves"])

    def white_share(train_crop: str) -> list[float]:
        image = ImageSpec(67, 76, train_crop, (0.0, 0.0, 0.0), (255.0, 255.0, 255.0))  # pixels in 0..1
        shard = ShardSpec(0, 1, 8, seed=5)
        if kind == "dali":
            loader = DaliLoader(index, "train", image, shard, torch.device("cpu"), 1, 2, "cpu")
        else:
            loader = TorchvisionLoader(index, "train", image, shard, torch.device("cpu"), 0, 2)
        shares = []
        for _ in range(8):  # 8 epochs of 16 patches
            for images, _ in loader:
                assert images.shape[1:] == (3, 67, 67)
                shares += (images > 0.5).float().mean(dim=(1, 2, 3)).tolist()
        return shares

    paper, zoomed = white_share("paper"), white_share("random_resized")
    assert all(0.3 < s < 0.7 for s in paper), paper  # 67/76 of the side: both halves, near even
    single = [s for s in zoomed if s < 0.02 or s > 0.98]
    # 14% of such crops fall inside one half (sampled with torchvision's own parameter draw):
    # about 18 of 128; 6 is three standard deviations below, 0 is what the paper crop gives.
    assert len(single) >= 6, zoomed


def test_torchvision_loader_takes_a_date_as_data_seed(tiny_data):
    """sample_seed's product passes 2**64 from data.seed ~1.85e6; torch.manual_seed refuses it."""
    from pipelines.torchvision_loader import sample_seed

    index = build_file_index(tiny_data / "train")
    for split in ("train", "val"):
        images, _ = next(iter(tv(index, split, seed=20241205)))
        assert images.shape == (4, 3, 67, 67)
    assert sample_seed(42, 3, 7) == (42 * 1_000_003 + 3) * 10_000_019 + 7  # small seeds unchanged


@pytest.mark.dali
def test_a_dangling_symlink_is_listed_and_named_not_dropped(tiny_data, tmp_path):
    """A class folder's link whose target is gone (prepare_imagenet.py symlinks by default) is in
    the index, as in ImageFolder's, so the decoder names it instead of the split losing it."""
    good = build_file_index(tiny_data / "val").files[0]
    folder = tmp_path / "val" / "a"
    folder.mkdir(parents=True)
    (folder / "good.jpg").symlink_to(good)
    (folder / "gone.jpg").symlink_to(tmp_path / "moved" / "x.jpg")
    index = build_file_index(tmp_path / "val")
    assert [Path(f).name for f in index.files] == ["gone.jpg", "good.jpg"]
    with pytest.raises(DataError, match=r"gone\.jpg \(cannot stat"):
        list(dali(index, "val", batch=2))


def test_folders_inside_class_folders_are_not_read_and_training_says_so(tiny_data, tmp_path, caplog):
    """Only the images directly in a class folder are read (ImageFolder would also read nested
    ones): a nested folder is reported by the index, and training's set-up names it."""
    import logging
    import shutil

    from alexnet.config import load_config
    from alexnet.data import build_splits

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    first = sorted(p for p in (root / "train").iterdir())[0]
    (first / "more").mkdir()
    shutil.copy(next(first.glob("*.jpg")), first / "more" / "nested.jpg")
    (first / ".cache").mkdir()  # hidden folders are not reported
    index = build_file_index(root / "train")
    assert index.unread_folders == (f"{first.name}/more",)
    assert not any("nested.jpg" in f for f in index.files)
    assert build_file_index(root / "val").unread_folders == ()
    with caplog.at_level(logging.WARNING, logger="alexnet"):
        build_splits(load_config(None, [f"data.root={root}"]).data, 0)
    assert f"{root / 'train'}: 1 folder(s) inside class folders" in caplog.text and f"{first.name}/more" in caplog.text
    assert str(root / "val") not in caplog.text


@pytest.mark.parametrize("train_crop", ["paper", "random_resized"])
def test_the_torchvision_training_transform_mirrors_about_half_the_patches(train_crop):
    """Section 4.1: patches and their horizontal reflections. An image bright on the left and
    dark on the right (a ramp) keeps its left half brighter in any crop of it, unless mirrored.
    100 draws of the transform under seeds 0..99 (as IndexedImages seeds each sample): a fair coin
    gives 50 +- 5 mirrored ones; 20..80 is six standard deviations either side (Hoeffding: a fair
    coin leaves it with probability below 2 exp(-2 * 100 * 0.3^2) = 3e-8), and a transform
    without the flip gives 0. The flip was dropped from the paper crop's transform unnoticed: the
    tests compared augmentations with themselves."""
    from pipelines.torchvision_loader import build_transform

    ramp = np.linspace(255, 0, 60)[None, :, None].repeat(50, 0).repeat(3, 2)  # 60 wide, 50 high
    img = Image.fromarray(ramp.round().astype(np.uint8))
    transform = build_transform(ImageSpec(40, 50, train_crop, (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)), "train")
    mirrored = 0
    for seed in range(100):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            patch = transform(img)
        assert patch.shape == (3, 40, 40)
        left, right = patch[:, :, :20].mean().item(), patch[:, :, 20:].mean().item()
        assert left != right  # every patch spans part of the ramp: one side is brighter
        mirrored += left < right
    assert 20 <= mirrored <= 80, mirrored


@pytest.mark.dali
@pytest.mark.parametrize(("width", "height"), [(333, 500), (500, 333)])
def test_resize_shorter_rounds_the_longer_side_to_nearest_as_dali_does(width, height):
    """333 x 500 with the shorter side to 77: the longer becomes 500 * 77 / 333 = 38500 / 333 =
    115.6 pixels, 116 rounded to nearest, 115 truncated (torchvision's Resize truncates). DALI's
    fn.resize(resize_shorter=...) gives 116, checked here on the same shape; its documentation
    states the rounding only for tensor_resize (size_rounding='round'), so the check is
    DALI's behaviour itself."""
    from fractions import Fraction

    from nvidia.dali import fn, pipeline_def

    from pipelines.torchvision_loader import ResizeShorter

    longer = round(Fraction(max(width, height) * 77, min(width, height)))  # exact: 38500/333, not a tie
    assert longer == 116 and int(Fraction(38500, 333)) == 115  # where rounding and truncating differ
    expected = (77, longer) if width < height else (longer, 77)  # PIL's (width, height)
    resized = ResizeShorter(77)(Image.new("RGB", (width, height)))
    assert resized.size == expected

    @pipeline_def
    def resize_shorter():
        blank = fn.external_source(source=lambda: [np.zeros((height, width, 3), np.uint8)], batch=True, layout="HWC")
        return fn.resize(blank, resize_shorter=77)

    pipe = resize_shorter(batch_size=1, num_threads=1, device_id=None)
    pipe.build()
    assert np.array(pipe.run()[0].as_tensor()).shape == (1, expected[1], expected[0], 3)  # HWC


def test_a_closed_torchvision_loader_iterates_again_with_new_workers(tiny_data):
    """close() stops the workers now; the loader failed afterwards ("'NoneType' object is not
    iterable") where a closed DaliLoader rebuilds its pipeline."""
    loader = tv(build_file_index(tiny_data / "val"), "val", workers=1)
    first = [labels.tolist() for _, labels in loader]
    loader.close()
    assert [labels.tolist() for _, labels in loader] == first
    loader.close()
