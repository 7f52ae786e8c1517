"""PCA lighting (section 4.1): the shift's statistics, its place in the training graph, and the
measured eigen statistics."""

import logging
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from _helpers import REPO, dali_missing, launcher
from PIL import Image

from pipelines.base import ImageSpec, ShardSpec
from pipelines.index import build_file_index
from pipelines.lighting import (
    IMAGENET_DEFAULT,
    STATS_FILE,
    Lighting,
    LightingStats,
    LightingStatsError,
    apply_lighting,
    build_lighting_shift,
    compute_lighting_stats,
    load_lighting_stats,
    resolve_lighting_stats,
    save_lighting_stats,
)

if not dali_missing():  # for the tests marked dali (skipped where DALI is not installed)
    from nvidia.dali import fn, pipeline_def, types

    from pipelines.dali import DaliLoader

CPU = torch.device("cpu")
GPU = torch.cuda.is_available()
MEAN = (124.0, 116.0, 104.0)
STD = (58.0, 57.0, 57.0)
LIGHT = Lighting(0.1, IMAGENET_DEFAULT)


def run_shifts(lighting: Lighting, batch: int, runs: int) -> np.ndarray:
    @pipeline_def
    def shifts():
        return build_lighting_shift(lighting)

    pipe = shifts(batch_size=batch, num_threads=1, device_id=None, seed=11)
    pipe.build()
    return np.concatenate([np.array(pipe.run()[0].as_tensor()) for _ in range(runs)]).astype(np.float64)


def test_imagenet_defaults_are_fb_resnet_values_in_0_255_units():
    # [0.2175, 0.0188, 0.0045] for 0-1 pixels = x 255^2 in 0-255 units; the shift's std along each
    # eigenvector is alpha_std * eigval / 255 = 0.1 * 255 * [0.2175, 0.0188, 0.0045].
    assert np.allclose(IMAGENET_DEFAULT.eigval, [14142.94, 1222.47, 292.61], atol=0.01)
    assert np.allclose(LIGHT.stats.component_std(0.1), [5.546, 0.4794, 0.11475], atol=1e-3)
    p = np.asarray(IMAGENET_DEFAULT.eigvec)
    assert np.allclose(p.T @ p, np.eye(3), atol=2e-4)


@pytest.mark.dali
def test_shift_has_zero_mean_and_the_computed_spread():
    shifts = run_shifts(LIGHT, batch=2000, runs=2)  # 4000 images
    n = len(shifts)
    expected_cov = IMAGENET_DEFAULT.shift_covariance(0.1)
    channel_std = np.sqrt(np.diag(expected_cov))
    assert np.allclose(channel_std, [3.1667, 3.2226, 3.2543], atol=1e-3)  # per R, G, B (0-255 units)
    # mean shift zero: within 4 standard errors per channel
    assert np.all(np.abs(shifts.mean(axis=0)) < 4 * channel_std / np.sqrt(n))
    # per-channel spread as computed (the std of a sample std is about std / sqrt(2n): 1.1% here)
    assert np.allclose(shifts.std(axis=0), channel_std, rtol=0.05)
    # along each eigenvector, including the two small ones that the channel spread hides
    along = shifts @ np.asarray(IMAGENET_DEFAULT.eigvec)
    assert np.allclose(along.std(axis=0), IMAGENET_DEFAULT.component_std(0.1), rtol=0.05)
    assert np.allclose(np.corrcoef(along.T), np.eye(3), atol=0.06)  # independent coefficients


@pytest.mark.dali
def test_shift_scales_with_alpha_std():
    small = run_shifts(Lighting(0.05, IMAGENET_DEFAULT), batch=500, runs=1)
    large = run_shifts(Lighting(0.1, IMAGENET_DEFAULT), batch=500, runs=1)
    assert np.allclose(large, 2 * small, rtol=1e-5, atol=1e-5)  # same seed: the same a, doubled std


@pytest.mark.dali
@pytest.mark.parametrize("layout", ["HWC", "CHW"])
def test_apply_lighting_adds_the_same_shift_to_every_pixel(layout):
    @pipeline_def
    def lit():
        image = fn.random.uniform(range=(0, 255), shape=[5, 4, 3], dtype=types.FLOAT)
        image = fn.cast(image, dtype=types.UINT8)
        if layout == "CHW":
            image = fn.transpose(image, perm=[2, 0, 1])
        shift = build_lighting_shift(LIGHT)
        return image, apply_lighting(image, LIGHT, layout, shift=shift), shift

    pipe = lit(batch_size=6, num_threads=1, device_id=None, seed=3)
    pipe.build()
    image, out, shift = (np.array(t.as_tensor()) for t in pipe.run())
    assert out.dtype == np.float32
    view = shift[:, None, None, :] if layout == "HWC" else shift[:, :, None, None]
    assert np.array_equal(out, image.astype(np.float32) + view)
    assert np.all(np.abs(shift).max(axis=1) > 0)


@pytest.mark.dali
@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA")
def test_apply_lighting_in_a_gpu_graph():
    @pipeline_def
    def lit():
        image = fn.cast(fn.random.uniform(range=(0, 255), shape=[5, 4, 3], dtype=types.FLOAT), dtype=types.UINT8)
        shift = build_lighting_shift(LIGHT)
        return image, apply_lighting(image.gpu(), LIGHT, "HWC", shift=shift), shift

    pipe = lit(batch_size=4, num_threads=1, device_id=0, seed=3)
    pipe.build()
    image, out, shift = pipe.run()
    image, out, shift = np.array(image.as_tensor()), np.array(out.as_cpu().as_tensor()), np.array(shift.as_tensor())
    assert np.allclose(out, image + shift[:, None, None, :], atol=1e-4)


@pytest.mark.dali
@pytest.mark.parametrize(
    "decoder", ["cpu", pytest.param("mixed", marks=[pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="CUDA")])]
)
def test_training_graph_shifts_each_image_by_one_rgb_vector(tiny_data, decoder):
    """The same seed with and without lighting: identical crops and mirrors (the lighting op has
    its own seed), and the lit image is the unlit one plus one RGB vector per image."""
    index = build_file_index(tiny_data / "train")
    image = ImageSpec(67, 76, "paper", MEAN, STD)
    device = torch.device("cuda", 0) if decoder == "mixed" else CPU

    def epoch(lighting):
        loader = DaliLoader(index, "train", image, ShardSpec(0, 1, 8, 4), device, 1, 2, decoder, lighting=lighting)
        return torch.cat([x.cpu() for x, _ in loader])

    plain, lit = epoch(None), epoch(LIGHT)
    assert torch.equal(epoch(Lighting(0.0, IMAGENET_DEFAULT)), plain)  # alpha std 0 = off
    diff = (lit - plain).double() * torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)  # 0-255 units
    shifts = diff.mean(dim=(2, 3))  # [N, 3]
    assert (diff - shifts[:, :, None, None]).abs().max() < 1e-3  # constant over the image
    assert shifts.abs().max(dim=1).values.min() > 0  # every image lit
    # 120 images: the spread of the shifts is that of the eigen statistics (loosely: n is small)
    expected = np.sqrt(np.trace(IMAGENET_DEFAULT.shift_covariance(0.1)))  # 5.57 (0-255 units)
    assert 0.75 * expected < shifts.pow(2).sum(dim=1).mean().sqrt().item() < 1.25 * expected


def write_gaussian_pngs(folder, count=6, seed=0):
    """PNGs (lossless) whose pixels come from a correlated Gaussian, and the pixels themselves."""
    rng = np.random.default_rng(seed)
    mixing = np.array([[40.0, 0, 0], [30.0, 12.0, 0], [25.0, 8.0, 3.0]])
    folder.mkdir(parents=True)
    pixels = []
    for i in range(count):
        h, w = 20 + i, 30 - i
        values = np.array([120.0, 110.0, 100.0]) + rng.standard_normal((h * w, 3)) @ mixing.T
        img = values.clip(0, 255).round().astype(np.uint8).reshape(h, w, 3)
        Image.fromarray(img).save(folder / f"{i}.png")
        pixels.append(img.reshape(-1, 3))
    return sorted(str(p) for p in folder.glob("*.png")), np.concatenate(pixels).astype(np.float64)


def test_statistics_are_the_eigen_decomposition_of_the_pixel_covariance(tmp_path):
    files, pixels = write_gaussian_pngs(tmp_path / "train" / "a")
    stats = compute_lighting_stats(files, num_images=100, workers=1, source="test")
    cov = np.cov(pixels.T, bias=True)
    p, eigval = np.asarray(stats.eigvec), np.asarray(stats.eigval)
    assert stats.num_images == 6 and stats.num_pixels == len(pixels)
    assert np.allclose(stats.mean, pixels.mean(axis=0), rtol=1e-12)
    assert np.allclose(p @ np.diag(eigval) @ p.T, cov, rtol=1e-9)
    assert np.allclose(eigval, np.sort(np.linalg.eigvalsh(cov))[::-1], rtol=1e-9)
    assert list(eigval) == sorted(eigval, reverse=True) and eigval[0] > 2000  # a dominant component
    # threads do not change the result; a sample of 3 images reads 3
    assert compute_lighting_stats(files, num_images=100, workers=3, source="test") == stats
    calls = []
    three = compute_lighting_stats(files, num_images=3, seed=1, workers=2, progress=calls.append)
    assert three.num_images == 3 and calls == [1, 1, 1]


def test_statistics_file_round_trip_and_errors(tmp_path):
    stats = LightingStats((900.0, 40.0, 2.0), ((0.6, 0.8, 0.0), (0.8, -0.6, 0.0), (0.0, 0.0, 1.0)), (1.0, 2.0, 3.0))
    path = save_lighting_stats(stats, tmp_path / "s.json")
    assert load_lighting_stats(path) == stats
    path.write_text(path.read_text().replace('"eigval": [', '"eigval": [-1, '))
    with pytest.raises(LightingStatsError, match=r"s\.json.*'eigval'"):
        load_lighting_stats(path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LightingStatsError, match=r"bad\.json is not valid JSON"):
        load_lighting_stats(tmp_path / "bad.json")


def test_resolving_statistics_beside_the_data_or_the_defaults(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="alexnet"):
        assert resolve_lighting_stats("", tmp_path) is IMAGENET_DEFAULT
    assert "using the ImageNet defaults of fb.resnet.torch" in caplog.text
    measured = LightingStats((5.0, 2.0, 1.0), ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    save_lighting_stats(measured, tmp_path / STATS_FILE)
    assert resolve_lighting_stats("", tmp_path).eigval == (5.0, 2.0, 1.0)
    elsewhere = save_lighting_stats(measured, tmp_path / "other.json")
    assert resolve_lighting_stats(str(elsewhere), tmp_path / "nowhere").eigval == (5.0, 2.0, 1.0)


def test_lighting_stats_command_writes_the_file_and_reports_the_mean_pixel(tmp_path, capsys, caplog):
    files, pixels = write_gaussian_pngs(tmp_path / "data" / "train" / "a", count=4)
    command = launcher("lighting_stats")
    assert command.main(["--data", str(tmp_path / "data"), "--images", "10", "--workers", "1"]) == 0
    stats = load_lighting_stats(tmp_path / "data" / STATS_FILE)
    assert stats.num_images == 4 and stats.num_pixels == len(pixels)
    mean = ", ".join(f"{m:.2f}" for m in np.asarray(pixels, dtype=np.float64).mean(axis=0))
    assert f"mean pixel (for data.mean) [{mean}]" in capsys.readouterr().out + caplog.text
    folder = tmp_path / "folder"
    folder.mkdir()
    data = ["--data", str(tmp_path / "data"), "--workers", "1"]
    assert command.main([*data, "--out", str(folder)]) == 2  # it measured everything, then lost it on write
    assert capsys.readouterr().err == f"error: --out {folder}: {folder} is a folder, not a file\n"
    assert list(folder.iterdir()) == []  # and left a stray temporary file
    assert command.main([*data, "--decode-size", "0"]) == 2  # a ZeroDivisionError traceback
    assert capsys.readouterr().err == "error: --decode-size must be >= 1, got 0\n"


def test_a_full_disk_keeps_the_earlier_statistics_and_prints_the_new_ones(tmp_path, capsys, monkeypatch):
    """save_lighting_stats was outside any error handling: a traceback after minutes of decoding."""
    write_gaussian_pngs(tmp_path / "data" / "train" / "a", count=2)
    command, data = launcher("lighting_stats"), ["--data", str(tmp_path / "data"), "--workers", "1"]
    assert command.main(data) == 0
    capsys.readouterr()
    out = tmp_path / "data" / STATS_FILE
    earlier = out.read_bytes()

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipelines.lighting.write_text_atomic", full_disk)
    assert command.main([*data, "--seed", "1"]) == 1
    said = capsys.readouterr()
    assert said.err == f"error: cannot write {out}: No space left on device (the statistics above are not saved)\n"
    assert "mean pixel (for data.mean)" in said.out and out.read_bytes() == earlier


def test_out_replaces_earlier_statistics_and_no_other_file(tmp_path, capsys):
    """--out naming a checkpoint printed "120 images ... -> last.pt" and left the JSON in its place."""
    write_gaussian_pngs(tmp_path / "data" / "train" / "a", count=2)
    command, data = launcher("lighting_stats"), ["--data", str(tmp_path / "data"), "--workers", "1"]
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.zeros(3)}, "progress": {"epoch": 4}}, checkpoint)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text('{"split": "train", "step": 1, "loss": 2.3}\n')
    for other in (checkpoint, metrics):
        before = other.read_bytes()
        assert command.main([*data, "--out", str(other)]) == 2
        said = f"error: --out {other}: the file exists and is not an earlier result of launch/lighting_stats.py"
        assert capsys.readouterr() == ("", f"{said}; name a new file (nothing was overwritten)\n")  # nothing measured
        assert other.read_bytes() == before
    out = tmp_path / "stats.json"
    assert command.main([*data, "--out", str(out)]) == 0
    out.write_text(out.read_text().replace('"format"', '"marker": 1,\n  "format"'))  # an earlier result, edited
    assert command.main([*data, "--out", str(out)]) == 0
    assert "marker" not in out.read_text() and load_lighting_stats(out).num_images == 2


def test_alpha_std_must_not_be_negative(capsys):
    """--alpha-std -1 printed negative standard deviations; 0 (no lighting) is one of the values training takes."""
    command = launcher("lighting_stats")
    assert command.parse_args(["--alpha-std", "0"]).alpha_std == 0.0
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit) as stopped:
            command.parse_args(["--alpha-std", bad])
        assert stopped.value.code == 2
        said = f"error: argument --alpha-std: must be a finite number >= 0 (0: no lighting), got {bad}\n"
        assert capsys.readouterr().err.endswith(said)


def test_statistics_skip_a_file_whose_header_declares_a_bomb_size(tmp_path, caplog):
    files, pixels = write_gaussian_pngs(tmp_path / "train" / "a", count=3)
    bomb = tmp_path / "train" / "a" / "bomb.png"
    bomb.write_bytes(png_declaring(20000, 20000))  # 400M pixels: PIL refuses to open it
    with caplog.at_level(logging.WARNING, logger="alexnet"):
        stats = compute_lighting_stats([*files, str(bomb)], num_images=10, workers=1, source="test")
    assert stats.num_images == 3 and stats.num_pixels == len(pixels)
    assert f"skipping {bomb}" in caplog.text
    # what the result rests on, once: the skipped file is not replaced by another
    assert "1 of the 4 sampled files could not be read and were skipped (not replaced by others); the statistics " \
        "come from the other 3" in caplog.text  # fmt: skip


def test_statistics_of_16_bit_grayscale_use_its_8_bit_values(tmp_path):
    wide = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    path = tmp_path / "gray16.png"
    Image.fromarray(wide).save(path)
    stats = compute_lighting_stats([str(path)], workers=1, source="test")
    expected = np.rint(wide / 257.0).mean()  # not PIL's convert("RGB"), which clips at 255
    assert np.allclose(stats.mean, [expected] * 3, rtol=1e-12) and expected < 128


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


@pytest.mark.dali
def test_ranks_that_read_different_lighting_statistics_stop_naming_them(tiny_data, tmp_path):
    """Each rank reads the statistics on its own (data.lighting_stats may name a node's own copy):
    a node whose copy of the data lacked pca_lighting.json, or a file measured while the run
    started, lit the ranks' images with different numbers, without a word."""
    from _helpers import TINY_TRAIN, TRAIN, launch, rank_1_differs

    measured = LightingStats((900.0, 40.0, 2.0), ((0.6, 0.8, 0.0), (0.8, -0.6, 0.0), (0.0, 0.0, 1.0)), source="m")
    path = save_lighting_stats(measured, tmp_path / "measured.json")
    wrapper = rank_1_differs(tmp_path, TRAIN, (f"data.lighting_stats={path}",))
    args = [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=lit", "data.lighting_std=0.1"]
    proc = launch([wrapper, *args, "train.max_steps=1"])
    named = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(named) == 2 and named[0] == named[1], proc.stderr[-3000:]
    assert named[0].startswith("error: the ranks read different PCA lighting statistics (rank 0: ImageNet defaults")
    assert "; rank 1: m (eigenvalues 900.0, 40.0, 2.0)); every node needs the same statistics" in named[0]
    same = launch([TRAIN, *args, f"data.lighting_stats={path}", "run.name=same", "train.max_steps=1"])
    assert same.returncode == 0 and "PCA lighting (alpha std 0.1): m" in same.stderr, same.stderr[-3000:]


def test_a_missing_data_folder_and_an_unwritable_default_output_are_named_as_such(tmp_path, capsys, monkeypatch):
    """A mistyped --data, or a read-only dataset (the usual shared mount), was reported as
    "error: --out <data>/pca_lighting.json: ... is not a writable folder", an --out never given."""
    import pipelines.outputs

    command = launcher("lighting_stats")
    assert command.main(["--data", str(tmp_path / "missing"), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "--out" not in err and str(tmp_path / "missing" / "train") in err, err
    write_gaussian_pngs(tmp_path / "data" / "train" / "a", count=2)
    monkeypatch.setattr(pipelines.outputs, "_can_create_in", lambda folder: False)  # read-only (root passes the bits)
    assert command.main(["--data", str(tmp_path / "data"), "--workers", "1"]) == 2
    out = tmp_path / "data" / "pca_lighting.json"
    assert capsys.readouterr().err == (
        f"error: the default output {out} (--out for another): {tmp_path / 'data'} is not a writable folder\n"
    )


def test_statistics_are_saved_when_stdout_fails(tmp_path):
    """The printed summary came first, outside any handler: a stdout on a full disk ended the
    command in a traceback and the statistics were not saved."""
    write_gaussian_pngs(tmp_path / "data" / "train" / "a", count=2)
    out = tmp_path / "stats.json"
    script = REPO / "launch" / "lighting_stats.py"
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, str(script), "--data", str(tmp_path / "data"), "--workers", "1",
                               "--out", str(out)], stdout=full, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert load_lighting_stats(out).num_images == 2
