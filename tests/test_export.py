"""Export round trips: TorchScript and ONNX for both variants (output checked against PyTorch on
another batch size), and a torchvision-variant checkpoint straight into torchvision's AlexNet."""

import importlib.util
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
from _helpers import REPO

from alexnet import export as export_module
from alexnet.checkpoint import CheckpointError, atomic_save
from alexnet.config import config_to_dict, load_config
from alexnet.export import (
    FORMATS,
    ExportCheckError,
    ExportSetupError,
    compare_outputs,
    default_formats,
    export_checkpoint,
    load_torchscript,
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
    """One checkpoint per variant (the torchvision one is 230 MB: written once)."""
    root = tmp_path_factory.mktemp("export")
    return {variant: make_checkpoint(root / variant / "checkpoints", variant) for variant in SIZES}


def batch(variant, n, seed):
    return torch.randn(n, 3, SIZES[variant], SIZES[variant], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["paper", "torchvision"])
def test_torchscript_and_onnx_match_pytorch(tmp_path, checkpoints, variant):
    ckpt = checkpoints[variant]
    checks = export_checkpoint(ckpt, tmp_path / "out", "m", ["torchscript", "onnx"])
    assert [c.path.name for c in checks] == ["m.torchscript.pt", "m.onnx"]
    assert all(c.batch == 3 and c.max_abs_diff <= 1e-5 + 1e-4 * c.max_abs_output for c in checks)
    # independently of the exporter's own check: a batch of 5 through each file
    model = build_model_from_checkpoint(ckpt).model
    x = batch(variant, 5, seed=7)
    with torch.no_grad():
        expected = model(x)
        scripted = load_torchscript(tmp_path / "out" / "m.torchscript.pt")(x)
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "m.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"images": x.numpy()})
    assert expected.shape == (5, 10) and expected.std() > 0
    assert torch.allclose(scripted, expected, rtol=1e-5, atol=1e-6)
    assert np.allclose(onnx_out, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_torchvision_checkpoint_loads_into_torchvision_alexnet(tmp_path, checkpoints):
    ckpt = checkpoints["torchvision"]
    state = torch.load(ckpt, weights_only=True)["model"]
    reference = torchvision.models.alexnet(weights=None, num_classes=10)
    reference.load_state_dict(state, strict=True)  # the checkpoint's own state dict, nothing renamed
    (check,) = export_checkpoint(ckpt, tmp_path / "out", "tv", ["torchvision"])
    assert check.max_abs_diff == 0.0
    reloaded = torchvision.models.alexnet(weights=None, num_classes=10).eval()
    reloaded.load_state_dict(torch.load(tmp_path / "out" / "tv.torchvision.pth", weights_only=True), strict=True)
    x = batch("torchvision", 4, seed=3)
    with torch.no_grad():
        assert torch.equal(reloaded(x), build_model_from_checkpoint(ckpt).model(x))


def test_paper_checkpoint_is_refused_for_torchvision_and_bad_outputs_fail(tmp_path, checkpoints):
    ckpt = checkpoints["paper"]
    with pytest.raises(CheckpointError, match="'paper' variant; only 'torchvision' checkpoints"):
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
        CheckpointError, match=r"fc6 and fc7 64 wide \(model\.fc_width\); torchvision\.models\.alexnet's are 4096"
    ):
        export_checkpoint(narrow, tmp_path / "out", "n", ["torchvision"])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (check,) = export_checkpoint(narrow, tmp_path / "out", "n", ["torchscript"])
    assert check.path.name == "n.torchscript.pt" and check.max_abs_diff <= 1e-5 + 1e-4 * check.max_abs_output


def test_export_command(tmp_path, checkpoints, capsys):
    ckpt = checkpoints["paper"]  # <root>/paper/checkpoints/last.pt
    spec = importlib.util.spec_from_file_location("export_command", REPO / "launch" / "export.py")
    command = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(command)
    assert command.main([str(ckpt), "--out", str(tmp_path / "exports"), "--format", "torchscript"]) == 0
    assert "max |difference| from PyTorch" in capsys.readouterr().out
    exported = load_torchscript(tmp_path / "exports" / "paper.torchscript.pt")  # named after the run folder
    model = build_model_from_checkpoint(ckpt).model.eval()
    x = batch("paper", 3, seed=4)
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), rtol=1e-5, atol=1e-6)  # the checkpoint's function


def test_a_file_of_an_export_s_name_is_replaced_only_where_it_is_an_earlier_export(tmp_path, checkpoints, capsys):
    """`--name mine` over a folder holding mine.torchscript.pt (a checkpoint copied there) and
    mine.onnx (notes): both were replaced, the checkpoint lost. An earlier export is replaced."""
    out, ckpt = tmp_path / "out", checkpoints["torchvision"]
    out.mkdir()
    (out / "mine.torchscript.pt").write_bytes(ckpt.read_bytes())
    (out / "mine.onnx").write_text("notes")
    (out / "mine.torchvision.pth").write_bytes(ckpt.read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    command = load_export_command()
    for fmt, suffix in (("torchscript", ".torchscript.pt"), ("onnx", ".onnx"), ("torchvision", ".torchvision.pth")):
        assert command.main([str(ckpt), "--out", str(out), "--name", "mine", "--format", fmt]) == 2
        said = capsys.readouterr().err
        assert said.startswith(
            f"error: {out / ('mine' + suffix)} exists and is not what an earlier {fmt} export writes ("
        ), said
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    for p in out.iterdir():
        p.unlink()
    assert command.main([str(ckpt), "--out", str(out), "--name", "mine"]) == 0  # all three formats
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sorted(first) == ["mine.onnx", "mine.torchscript.pt", "mine.torchvision.pth"]
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


def load_export_command():
    spec = importlib.util.spec_from_file_location("export_command", REPO / "launch" / "export.py")
    command = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(command)
    return command


def test_an_export_that_fails_its_check_is_not_kept_and_keeps_the_earlier_one(tmp_path, checkpoints, monkeypatch):
    ckpt, out = checkpoints["paper"], tmp_path / "out"
    (good,) = export_checkpoint(ckpt, out, "m", ["torchscript"])
    kept = good.path.read_bytes()
    real_load = export_module.load_torchscript

    def off_by_one(path):
        model = real_load(path)
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

    def load_once_both_are_written(path):
        both_written.wait()  # both exports have written their file; neither has renamed it yet
        return real_load(path)

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


def load_command():
    spec = importlib.util.spec_from_file_location("export_command", REPO / "launch" / "export.py")
    command = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(command)
    return command


def test_under_torchrun_only_rank_0_exports(tmp_path, checkpoints, monkeypatch, capsys):
    """Every rank exported into the same folder at once (torchrun --nproc_per_node=2)."""
    command, ckpt = load_command(), checkpoints["paper"]
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
    spec = importlib.util.spec_from_file_location("export_command", REPO / "launch" / "export.py")
    command = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(command)
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
    spec = importlib.util.spec_from_file_location("export_command", REPO / "launch" / "export.py")
    command = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(command)
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
