"""Export round trips: TorchScript and ONNX for both variants (output checked against PyTorch on
another batch size), and a torchvision-variant checkpoint straight into torchvision's AlexNet."""

import json
import os
import re
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torchvision
from _helpers import TINY_FC_WIDTH, launcher

from alexnet import export as export_module
from alexnet.checkpoint import FORMAT_VERSION, CheckpointError, atomic_save
from alexnet.config import config_to_dict, load_config
from alexnet.export import (
    FORMATS,
    ExportCheckError,
    ExportFormatError,
    ExportMetadataError,
    ExportSetupError,
    compare_outputs,
    default_formats,
    export_checkpoint,
    load_torchscript,
    read_export_metadata,
)
from alexnet.inference import build_model_from_checkpoint
from alexnet.model import build_model

SIZES = {"paper": 67, "torchvision": 63}  # the smallest inputs each variant's pooling allows


def make_checkpoint(folder, variant, fc_width=4096):
    size = SIZES[variant]
    cfg = load_config(None, [f"model.variant={variant}", f"data.crop={size}", "data.resize=76", "model.num_classes=10",
                             f"model.fc_width={fc_width}"])  # fmt: skip
    torch.manual_seed(1)
    model = build_model(variant, 10, 0.5, size, "kaiming", fc_width)
    payload = {"format": 1, "model": model.state_dict(), "config": config_to_dict(cfg), "progress": {}}
    return atomic_save(payload, folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One checkpoint per variant (the torchvision one is 230 MB: written once). The paper one has
    fc6 and fc7 TINY_FC_WIDTH wide: at 4096 it is 80 MB, which a dozen exports below trace, write
    and check; torchvision's AlexNet takes only 4096."""
    root = tmp_path_factory.mktemp("export")
    widths = {"paper": TINY_FC_WIDTH, "torchvision": 4096}
    return {variant: make_checkpoint(root / variant / "checkpoints", variant, widths[variant]) for variant in SIZES}


@pytest.fixture(scope="module")
def torchvision_export(tmp_path_factory, checkpoints):
    """The torchvision checkpoint exported once in every format (the variant's default), named
    `mine`: each format of its 230 MB model takes seconds to write and check. The tests that read
    such an export, or need an earlier one to replace (hard links to its files), share it."""
    return export_checkpoint(checkpoints["torchvision"], tmp_path_factory.mktemp("torchvision_export"), "mine")


def batch(variant, n, seed):
    return torch.randn(n, 3, SIZES[variant], SIZES[variant], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["paper", "torchvision"])
def test_torchscript_and_onnx_match_pytorch(tmp_path, checkpoints, variant, request):
    """The paper checkpoint exported in the two formats asked for; the torchvision one's export is
    the shared one of every format (its default)."""
    ckpt = checkpoints[variant]
    if variant == "paper":
        checks = export_checkpoint(ckpt, tmp_path / "out", "m", ["torchscript", "onnx"])
        assert [c.path.name for c in checks] == ["m.torchscript.pt", "m.onnx"]
    else:
        checks = request.getfixturevalue("torchvision_export")
        assert [c.path.name for c in checks] == ["mine.torchscript.pt", "mine.onnx", "mine.torchvision.pth"]
    assert all(c.batch == 3 and c.max_abs_diff <= 1e-5 + 1e-4 * c.max_abs_output for c in checks)
    # independently of the exporter's own check: a batch of 5 through each file
    model = build_model_from_checkpoint(ckpt).model
    x = batch(variant, 5, seed=7)
    with torch.no_grad():
        expected = model(x)
        scripted = load_torchscript(checks[0].path)(x)
    session = onnxruntime.InferenceSession(str(checks[1].path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"images": x.numpy()})
    assert expected.shape == (5, 10) and expected.std() > 0
    assert torch.allclose(scripted, expected, rtol=1e-5, atol=1e-6)
    assert np.allclose(onnx_out, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_torchvision_checkpoint_loads_into_torchvision_alexnet(checkpoints, torchvision_export):
    ckpt = checkpoints["torchvision"]
    state = torch.load(ckpt, weights_only=True)["model"]
    reference = torchvision.models.alexnet(weights=None, num_classes=10)
    reference.load_state_dict(state, strict=True)  # the checkpoint's own state dict, nothing renamed
    check = torchvision_export[2]  # mine.torchvision.pth
    assert check.max_abs_diff == 0.0
    reloaded = torchvision.models.alexnet(weights=None, num_classes=10).eval()
    reloaded.load_state_dict(torch.load(check.path, weights_only=True), strict=True)
    x = batch("torchvision", 4, seed=3)
    with torch.no_grad():
        assert torch.equal(reloaded(x), build_model_from_checkpoint(ckpt).model(x))


def test_paper_checkpoint_is_refused_for_torchvision_and_bad_outputs_fail(tmp_path, checkpoints):
    ckpt = checkpoints["paper"]
    with pytest.raises(ExportFormatError, match="'paper' variant; only 'torchvision' checkpoints"):
        export_checkpoint(ckpt, tmp_path / "out", "m", ["torchvision"])
    expected = torch.ones(3, 10)
    with pytest.raises(ExportCheckError, match="differ from PyTorch by up to 0.01"):
        compare_outputs(expected, expected + 0.01, tmp_path / "x", rtol=1e-4, atol=1e-5)
    with pytest.raises(ExportCheckError, match=r"output shape \(2, 10\)"):
        compare_outputs(expected, expected[:2], tmp_path / "x", rtol=1e-4, atol=1e-5)


def test_a_torchvision_checkpoint_of_another_fc_width_exports_to_all_but_torchvisions_alexnet(tmp_path):
    narrow = make_checkpoint(tmp_path / "narrow" / "checkpoints", "torchvision", fc_width=64)
    config = build_model_from_checkpoint(narrow).config
    assert default_formats(config.model) == ["torchscript", "onnx"]
    assert default_formats(load_config(None, ["model.variant=torchvision"]).model) == list(FORMATS)
    with pytest.raises(
        ExportFormatError, match=r"fc6 and fc7 64 wide \(model\.fc_width\); torchvision\.models\.alexnet's are 4096"
    ):
        export_checkpoint(narrow, tmp_path / "out", "n", ["torchvision"])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (check,) = export_checkpoint(narrow, tmp_path / "out", "n", ["torchscript"])
    assert check.path.name == "n.torchscript.pt" and check.max_abs_diff <= 1e-5 + 1e-4 * check.max_abs_output


def test_export_command(tmp_path, checkpoints, capsys):
    ckpt = checkpoints["paper"]  # <root>/paper/checkpoints/last.pt
    command = launcher("export")
    assert command.main([str(ckpt), "--out", str(tmp_path / "exports"), "--format", "torchscript"]) == 0
    assert "max |difference| from PyTorch" in capsys.readouterr().out
    exported = load_torchscript(tmp_path / "exports" / "paper.torchscript.pt")  # named after the run folder
    model = build_model_from_checkpoint(ckpt).model.eval()
    x = batch("paper", 3, seed=4)
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), rtol=1e-5, atol=1e-6)  # the checkpoint's function


def test_a_file_of_an_export_s_name_is_replaced_only_where_it_is_an_earlier_export(
    tmp_path, checkpoints, torchvision_export, capsys
):
    """`--name mine` over a folder holding mine.torchscript.pt (a checkpoint copied there) and
    mine.onnx (notes): both were replaced, the checkpoint lost. An earlier export (the shared one
    of every format, linked into the folder) is replaced."""
    out, ckpt = tmp_path / "out", checkpoints["torchvision"]
    out.mkdir()
    (out / "mine.torchscript.pt").write_bytes(ckpt.read_bytes())
    (out / "mine.onnx").write_text("notes")
    (out / "mine.torchvision.pth").write_bytes(ckpt.read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    command = launcher("export")
    for fmt, suffix in (("torchscript", ".torchscript.pt"), ("onnx", ".onnx"), ("torchvision", ".torchvision.pth")):
        assert command.main([str(ckpt), "--out", str(out), "--name", "mine", "--format", fmt]) == 2
        said = capsys.readouterr().err
        assert said.startswith(
            f"error: {out / ('mine' + suffix)} exists and is not what an earlier {fmt} export writes ("
        ), said
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    for p in out.iterdir():
        p.unlink()
    for p in torchvision_export[0].path.parent.iterdir():  # all three formats: the default export's files
        os.link(p, out / p.name)  # the export renames new files into place: the shared ones stay as they are
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sorted(first) == ["mine.onnx", "mine.torchscript.pt", "mine.torchvision.json", "mine.torchvision.pth"]
    assert command.main([str(ckpt), "--out", str(out), "--name", "mine"]) == 0  # earlier exports: replaced
    assert all(p.stat().st_mtime_ns > first[p.name] for p in out.iterdir())
    # another tool's ONNX model, and a link (the rename would replace the link, not its target)
    import onnx

    graph = onnx.helper.make_graph([], "g", [], [])
    onnx.save(onnx.helper.make_model(graph, producer_name="tf2onnx"), out / "theirs.onnx")
    (out / "link.onnx").symlink_to(out / "mine.onnx")
    for name, said in (("theirs", "is not what an earlier onnx export writes"), ("link", "is a symbolic link")):
        assert command.main([str(ckpt), "--out", str(out), "--name", name, "--format", "onnx"]) == 2
        assert said in capsys.readouterr().err


def test_an_export_that_fails_its_check_is_not_kept_and_keeps_the_earlier_one(tmp_path, checkpoints, monkeypatch):
    ckpt, out = checkpoints["paper"], tmp_path / "out"
    (good,) = export_checkpoint(ckpt, out, "m", ["torchscript"])
    kept = good.path.read_bytes()
    real_load = export_module.load_torchscript

    def off_by_one(path, *extra_files):
        model = real_load(path, *extra_files)
        return lambda x: model(x) + 1.0  # an export whose outputs are wrong

    monkeypatch.setattr(export_module, "load_torchscript", off_by_one)
    with pytest.raises(ExportCheckError, match=rf"^{re.escape(str(out / 'm.torchscript.pt'))}: outputs differ"):
        export_checkpoint(ckpt, out, "m", ["torchscript"])
    assert good.path.read_bytes() == kept and sorted(p.name for p in out.iterdir()) == ["m.torchscript.pt"]
    with pytest.raises(ExportCheckError):
        export_checkpoint(ckpt, tmp_path / "fresh", "m", ["torchscript"])
    assert list((tmp_path / "fresh").iterdir()) == []  # nothing left behind


# warnings.catch_warnings is not thread-safe: one thread's exit restores the filters while the
# other thread's export still relies on them, so the warnings export_torchscript hides get through.
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_two_exports_into_one_folder_at_once_each_keep_a_complete_file(tmp_path, checkpoints, monkeypatch):
    """Both exports staged under one fixed name: the first rename took the other's file away
    (FileNotFoundError, or torch's "failed reading zip archive" on a half-written one)."""
    ckpt, out = checkpoints["paper"], tmp_path / "out"
    real_load = export_module.load_torchscript
    both_written = threading.Barrier(2, timeout=120)

    def load_once_both_are_written(path, *extra_files):
        both_written.wait()  # both exports have written their file; neither has renamed it yet
        return real_load(path, *extra_files)

    monkeypatch.setattr(export_module, "load_torchscript", load_once_both_are_written)
    results, failures = [], []

    def export():
        try:
            results.extend(export_checkpoint(ckpt, out, "m", ["torchscript"]))
        except Exception as exc:  # reported by the assertion below, not lost in the thread
            failures.append(exc)

    threads = [threading.Thread(target=export) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and [r.path for r in results] == [out / "m.torchscript.pt"] * 2
    assert sorted(p.name for p in out.iterdir()) == ["m.torchscript.pt"]  # no temporary file left
    x = batch("paper", 3, seed=5)
    with torch.no_grad():
        assert torch.allclose(real_load(out / "m.torchscript.pt")(x), build_model_from_checkpoint(ckpt).model(x))


def test_under_torchrun_only_rank_0_exports(tmp_path, checkpoints, monkeypatch, capsys):
    """Every rank exported into the same folder at once (torchrun --nproc_per_node=2)."""
    command, ckpt = launcher("export"), checkpoints["paper"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun's
    assert command.main([str(ckpt), "--out", str(tmp_path / "ranks"), "--format", "torchscript"]) == 0
    assert capsys.readouterr().err == f"rank 1: nothing to do, rank 0 exports into {tmp_path / 'ranks'}\n"
    assert not (tmp_path / "ranks").exists()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # a RANK left in a shell or a pod: the export is done
    assert command.main([str(ckpt), "--out", str(tmp_path / "left"), "--format", "torchscript"]) == 0
    assert (tmp_path / "left" / "paper.torchscript.pt").is_file()
    monkeypatch.setenv("RANK", "")  # `export RANK=$SLURM_PROCID` outside Slurm: as if unset
    assert command.main([str(ckpt), "--out", str(tmp_path / "ranks"), "--format", "torchscript"]) == 0
    assert (tmp_path / "ranks" / "paper.torchscript.pt").is_file()
    monkeypatch.setenv("RANK", "abc")
    assert command.main([str(ckpt), "--out", str(tmp_path / "bad"), "--format", "torchscript"]) == 2
    assert capsys.readouterr().err == "error: environment variable RANK='abc' is not an integer\n"


def test_export_into_a_file_is_a_one_line_error(tmp_path, checkpoints, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    command = launcher("export")
    assert command.main([str(checkpoints["paper"]), "--out", str(blocker), "--format", "torchscript"]) == 2
    assert capsys.readouterr().err == f"error: --out {blocker}: {blocker} is a file, not a folder\n"
    under_a_file = blocker / "exports"  # a path no folder can be made at: refused before the checkpoint loads
    assert command.main([str(checkpoints["paper"]), "--out", str(under_a_file), "--format", "torchscript"]) == 2
    assert capsys.readouterr().err == f"error: --out {under_a_file}: {blocker} is not a writable folder\n"


def test_onnx_without_its_packages_is_named_before_any_export(tmp_path, checkpoints, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the [export] extra were not installed
    with pytest.raises(ExportSetupError, match=r'ONNX export needs onnxscript: pip install -e "\.\[export\]"'):
        export_checkpoint(checkpoints["paper"], tmp_path / "asked", "m", ["torchscript", "onnx"])
    assert not (tmp_path / "asked").exists()  # not even the TorchScript file before it
    (kept,) = export_checkpoint(checkpoints["paper"], tmp_path / "default", "m")  # all formats: ONNX left out
    assert kept.path.name == "m.torchscript.pt" and "exporting the other formats" in caplog.text


def test_an_export_or_another_file_given_as_the_checkpoint_is_one_line(tmp_path, checkpoints, capsys):
    """An export fed back to export.py gave torch's 6 lines, advising weights_only=False."""
    made = export_checkpoint(checkpoints["paper"], tmp_path / "first", "m", ["torchscript", "onnx"])
    script, onnx = (c.path for c in made)
    text = tmp_path / "notes.txt"
    text.write_text("top-1 57%\n")
    command = launcher("export")
    exported = "launch/export.py writes those from a checkpoint; name the checkpoint itself"
    for path, what in ((script, f"a TorchScript archive: {exported}"), (onnx, f"an ONNX model: {exported}"),
                       (text, "not a PyTorch file")):  # fmt: skip
        assert command.main([str(path), "--out", str(tmp_path / "again"), "--format", "torchscript"]) == 1
        assert capsys.readouterr().err == f"error: {path} is not a checkpoint of this trainer ({what})\n"
    assert not (tmp_path / "again").exists() or not any((tmp_path / "again").iterdir())


def test_a_killed_export_s_staged_file_is_removed_by_the_next_export(tmp_path, checkpoints):
    """SIGKILL (or the out-of-memory killer) left `.m.torchscript.pt.tmp<pid>-<tid>.partial` for
    good: hidden, as large as the export. A running export's staged file is kept, and so is every
    other machine's (an exports folder on a network file system: its process ids are not ours)."""
    out = tmp_path / "out[1]"  # a glob's brackets in the name
    out.mkdir()
    host = export_module._host()
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # above any process id
    stage = ".m.torchscript.pt.tmp{}-1@{}.partial"
    abandoned = [out / stage.format(dead, host), out / stage.format(10**30, host)]
    kept = [
        out / stage.format(os.getppid(), host),  # this test's parent process lives on
        out / stage.format(dead, "another-node"),
        out / f".n.torchscript.pt.tmp{dead}-1@{host}.partial",  # another export's name
    ]
    for path in abandoned + kept:
        path.write_bytes(b"half")
    (done,) = export_checkpoint(checkpoints["paper"], out, "m", ["torchscript"])
    assert sorted(p.name for p in out.iterdir()) == sorted([done.path.name, *(p.name for p in kept)])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load's deprecation notice
def test_every_export_carries_the_class_names_the_preprocessing_and_its_checkpoint(
    tmp_path, checkpoints, torchvision_export
):
    """An export said neither which output is which class nor how to preprocess an image: each
    format carries them (ONNX metadata_props, the TorchScript archive's alexnet.json, and
    <name>.torchvision.json beside the .torchvision.pth, its only copy), read back as the
    checkpoint has them."""
    import onnx

    size = SIZES["paper"]
    cfg = load_config(None, ["model.variant=paper", f"data.crop={size}", "data.resize=80", "model.fc_width=64",
                             "data.mean=[120.0, 115.5, 100.25]", "data.std=[60.0, 59.0, 58.5]"])  # fmt: skip
    torch.manual_seed(2)
    model = build_model("paper", 3, 0.5, size, "kaiming", 64)
    classes = ["tulip", "daisy", "rose"]  # the output order, not sorted
    progress = {"epoch": 3, "epoch_trained": False, "step": 120, "images": 960}
    payload = {"format": FORMAT_VERSION, "model": model.state_dict(), "config": config_to_dict(cfg),
               "classes": classes, "progress": progress}  # fmt: skip
    ckpt = atomic_save(payload, tmp_path / "flowers" / "checkpoints")
    out = tmp_path / "out"
    export_checkpoint(ckpt, out, "f", ["torchscript", "onnx"])
    expected = {
        "variant": "paper", "num_classes": 3, "classes": classes, "input_size": size, "resize": 80,
        "mean": [120.0, 115.5, 100.25], "std": [60.0, 59.0, 58.5], "pixel_range": [0, 255], "channels": "RGB",
        "layout": "NCHW", "dtype": "float32", "checkpoint": str(ckpt.absolute()), "step": 120, "epoch": 3,
    }  # fmt: skip
    in_onnx = {p.key: json.loads(p.value) for p in onnx.load(out / "f.onnx").metadata_props}
    extra = {"alexnet.json": ""}
    torch.jit.load(out / "f.torchscript.pt", _extra_files=extra)
    in_torchscript = json.loads(extra["alexnet.json"])
    for found in (in_onnx, in_torchscript):
        assert {k: found.get(k) for k in expected} == expected
    assert in_onnx == in_torchscript == read_export_metadata(out / "f.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["f.onnx", "f.torchscript.pt"]  # no sidecar: none needed
    # model.num_classes above the folders' count: the outputs no folder trained are null, one
    # entry per output (10 names for 20 outputs made classes[argmax] an IndexError).
    wider = build_model("paper", 5, 0.5, size, "kaiming", 64)
    wide_cfg = {**config_to_dict(cfg), "model": {**config_to_dict(cfg)["model"], "num_classes": 5}}
    wide = atomic_save({**payload, "model": wider.state_dict(), "config": wide_cfg}, tmp_path / "wide" / "checkpoints")
    (wide_ts,) = export_checkpoint(wide, out, "w", ["torchscript"])
    found = read_export_metadata(wide_ts.path)
    assert (found["num_classes"], found["classes"]) == (5, [*classes, None, None])
    # A checkpoint written before class names were kept, with no progress: said as null.
    tv, check = checkpoints["torchvision"], torchvision_export[2]
    sidecar = read_export_metadata(check.path)  # mine.torchvision.json
    assert sidecar == json.loads(check.path.with_name("mine.torchvision.json").read_text())
    assert (sidecar["classes"], sidecar["step"], sidecar["epoch"]) == (None, None, None)
    shape = ("torchvision", 10, SIZES["torchvision"], 76)
    assert (sidecar["variant"], sidecar["num_classes"], sidecar["input_size"], sidecar["resize"]) == shape
    assert sidecar["checkpoint"] == str(tv.absolute())
    state = torch.load(check.path, weights_only=True)  # still the bare state dict
    assert set(state) == set(torchvision.models.alexnet(num_classes=10).state_dict())


def test_a_sidecar_name_holding_another_file_is_refused_and_an_earlier_sidecar_replaced(tmp_path, checkpoints, capsys):
    out, ckpt, command = tmp_path / "out", checkpoints["torchvision"], launcher("export")
    out.mkdir()
    side = out / "m.torchvision.json"
    notes = '{"top1": 0.57}\n'  # an evaluation's result, say
    side.write_text(notes)
    args = [str(ckpt), "--out", str(out), "--name", "m", "--format", "torchvision"]
    assert command.main(args) == 2
    assert capsys.readouterr().err == (
        f"error: {side} exists and is not what an earlier export writes (the JSON of a .torchvision.pth export's "
        "classes and preprocessing): name another --name or --out (nothing was overwritten)\n"
    )
    assert sorted(p.name for p in out.iterdir()) == ["m.torchvision.json"] and side.read_text() == notes
    side.unlink()
    side.symlink_to(tmp_path / "elsewhere.json")
    assert command.main(args) == 2 and "is a symbolic link" in capsys.readouterr().err
    side.unlink()
    assert command.main(args) == 0
    written = json.loads(side.read_text())
    side.write_text(json.dumps({**written, "classes": ["stale"]}))  # an earlier export's
    assert command.main(args) == 0
    assert json.loads(side.read_text()) == written
    assert sorted(p.name for p in out.iterdir()) == ["m.torchvision.json", "m.torchvision.pth"]  # no staged file


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load's deprecation notice
def test_each_export_s_metadata_is_its_own_and_an_older_export_says_it_has_none(tmp_path, checkpoints):
    """One <name>.json for every format described the latest export of that name: a TorchScript
    export of another checkpoint rewrote the metadata of the .torchvision.pth left beside it."""
    out = tmp_path / "out"
    (tv,) = export_checkpoint(checkpoints["torchvision"], out, "m", ["torchvision"])
    (ts,) = export_checkpoint(checkpoints["paper"], out, "m", ["torchscript"])
    assert read_export_metadata(tv.path)["variant"] == "torchvision"
    assert read_export_metadata(ts.path)["variant"] == "paper"
    (out / "m.torchvision.json").unlink()  # as an export from before exports carried metadata
    with pytest.raises(ExportMetadataError, match=r"m\.torchvision\.json carries no export metadata"):
        read_export_metadata(tv.path)
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(out / "old.torchscript.pt"))
    with pytest.raises(ExportMetadataError, match=r"old\.torchscript\.pt carries no export metadata"):
        read_export_metadata(out / "old.torchscript.pt")


def test_a_format_the_checkpoint_cannot_hold_is_a_command_to_change(tmp_path, checkpoints, capsys):
    """--format torchvision for the paper variant, or for another fc_width, exited 1, as for a
    damaged checkpoint; the same command can never succeed: exit 2, one line, nothing written."""
    narrow = make_checkpoint(tmp_path / "narrow" / "checkpoints", "torchvision", fc_width=64)
    command, out = launcher("export"), tmp_path / "out"
    for ckpt, said in (
        (checkpoints["paper"], "is the 'paper' variant; only 'torchvision' checkpoints load into"),
        (narrow, "has fc6 and fc7 64 wide (model.fc_width); torchvision.models.alexnet's are 4096"),
    ):
        assert command.main([str(ckpt), "--out", str(out), "--format", "torchscript", "torchvision"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --format torchvision: checkpoint {ckpt} ") and err.count("\n") == 1, err
        assert said in err
    assert not out.exists() or not any(out.iterdir())


def test_powersgd_state_given_as_the_checkpoint_names_the_run_s_checkpoint(tmp_path, capsys):
    """A rank's PowerSGD state file has the checkpoint format and no config: it was refused as a
    checkpoint that "holds no config (key 'config')"."""
    from alexnet.powersgd_checkpoint import rank_file

    ckpt_dir = tmp_path / "run" / "checkpoints"
    # As save_powersgd_state writes it: the step, the setup a resume must match, the rank's state.
    payload = {"format": FORMAT_VERSION, "step": 4, "setup": {"mode": "data"}, "state": {"fc6": torch.zeros(2)}}
    state = atomic_save(payload, rank_file(ckpt_dir, 0).parent, rotate=False)
    assert command_output(state, tmp_path, capsys) == (
        1,
        f"error: {state} is PowerSGD state of a run (one rank's error feedback, kept beside its checkpoint), not a "
        f"checkpoint: name the run's checkpoints/last.pt instead ({ckpt_dir / 'last.pt'})\n",
    )
    with pytest.raises(CheckpointError, match="holds no config"):  # a file of the format that is neither
        build_model_from_checkpoint(atomic_save({"format": FORMAT_VERSION, "model": {}}, tmp_path / "other"))


def command_output(checkpoint, tmp_path, capsys):
    status = launcher("export").main([str(checkpoint), "--out", str(tmp_path / "out")])
    return status, capsys.readouterr().err


def test_an_earlier_export_of_another_checkpoint_left_under_the_name_is_warned_of(tmp_path, checkpoints, caplog):
    """`--format onnx` of a newer checkpoint under the name of an older one's export left the
    older .torchscript.pt beside it without a word: two checkpoints under one name. It is left as
    it is (an export deletes nothing it did not write), with a warning that names both sources."""
    out, older = tmp_path / "out", checkpoints["paper"]
    export_checkpoint(older, out, "m")  # torchscript and onnx
    export_checkpoint(older, out, "m", ["onnx"])  # the same checkpoint again: nothing to say
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []
    newer = make_checkpoint(tmp_path / "newer" / "checkpoints", "paper", TINY_FC_WIDTH)
    payload = torch.load(newer, weights_only=True)
    atomic_save({**payload, "progress": {"step": 40, "epoch": 2}}, newer.parent, rotate=False)
    export_checkpoint(newer, out, "m", ["onnx"])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning == (
        f"{out / 'm.torchscript.pt'}, beside this export of {newer} (step 40), is an export of {older}; it was "
        "left as it was: export --format torchscript again, or remove it"
    )
    assert read_export_metadata(out / "m.torchscript.pt")["checkpoint"] == str(older)  # left as it was
    assert read_export_metadata(out / "m.onnx")["step"] == 40


def test_the_warning_never_costs_an_export_and_a_checkpoint_reached_by_a_link_is_the_same(
    tmp_path, checkpoints, caplog, monkeypatch
):
    """A damaged file beside the export (a half-copied .onnx whose first bytes are an export's)
    raised from the warning after the export was written; ONNX's metadata cannot be read where
    its package is missing. Both are warned of as unreadable, and the export is kept."""
    out, ckpt = tmp_path / "out", checkpoints["paper"]
    export_checkpoint(ckpt, out, "m")
    (tmp_path / "link").symlink_to(ckpt.parent, target_is_directory=True)
    export_checkpoint(tmp_path / "link" / ckpt.name, out, "m", ["torchscript"])  # the same file
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []
    onnx_file = out / "m.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:4000])  # cut short
    (result,) = export_checkpoint(ckpt, out, "m", ["torchscript"])
    assert result.path == out / "m.torchscript.pt"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    unreadable = f"{onnx_file}, beside this export of {ckpt}, is an export whose source cannot be read here ("
    assert warning.startswith(unreadable)
    assert warning.endswith("); it was left as it was: export --format onnx again, or remove it")
    caplog.clear()
    export_checkpoint(ckpt, out, "m", ["onnx"])
    monkeypatch.setitem(sys.modules, "onnx", None)  # as where the [export] extra is not installed
    export_checkpoint(ckpt, out, "m", ["torchscript"])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "is an export whose source cannot be read here (ModuleNotFoundError: " in warning
