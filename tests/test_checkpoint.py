import errno
import logging
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from alexnet.checkpoint import (
    CheckpointError,
    CheckpointUnusableHere,
    atomic_save,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    optimizer_hyperparams,
    optimizer_momentum,
)
from alexnet.config import CheckpointConfig, Config, ConfigError, DataConfig, OptimConfig, config_to_dict, load_config
from alexnet.export import export_torchscript
from alexnet.model import PaperAlexNet
from alexnet.optim import build_optimizer
from alexnet.resume import batch_change, changed_settings, kept_on_resume, load_resume_checkpoint


def payload(value: float) -> dict:
    return {"format": 1, "model": {"w": torch.full((3,), value)}}


def test_atomic_save_keeps_previous_and_leaves_no_temp_files(tmp_path):
    atomic_save(payload(1.0), tmp_path)
    atomic_save(payload(2.0), tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["model"]["w"][0] == 2.0
    assert load_checkpoint(tmp_path / "previous.pt")["model"]["w"][0] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]


def test_a_write_that_fails_between_its_renames_keeps_the_older_previous_pt(tmp_path, monkeypatch):
    """last.pt was renamed over previous.pt before the new file was renamed over last.pt: a write
    that failed (or was killed) between the two left previous.pt a second name of last.pt, and the
    older checkpoint, the one to go back to, was gone."""
    atomic_save(payload(1.0), tmp_path)
    atomic_save(payload(2.0), tmp_path)
    real_replace = os.replace

    def fails_on_last_pt(source, target):
        if str(target).endswith("last.pt"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", fails_on_last_pt)
        with pytest.raises(CheckpointError, match="Input/output error"):
            atomic_save(payload(3.0), tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["model"]["w"][0] == 2.0
    assert load_checkpoint(tmp_path / "previous.pt")["model"]["w"][0] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]
    atomic_save(payload(3.0), tmp_path)  # and the next write rotates as usual
    assert load_checkpoint(tmp_path / "previous.pt")["model"]["w"][0] == 2.0
    # An interrupted rotation of earlier versions left previous.pt and last.pt one file: no link stays
    (tmp_path / "previous.pt").unlink()
    os.link(tmp_path / "last.pt", tmp_path / "previous.pt")
    atomic_save(payload(4.0), tmp_path)
    assert load_checkpoint(tmp_path / "previous.pt")["model"]["w"][0] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]


def test_a_full_disk_during_a_write_is_one_error_that_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """torch.save's zip writer turns ENOSPC into "RuntimeError: [enforce fail ...] unexpected pos";
    that reached the user as a traceback, and the partial file stayed, keeping the disk full."""
    atomic_save(payload(1.0), tmp_path)
    real_save = torch.save

    def fills_the_disk(obj, f):
        real_save(obj, f)  # the bytes are there, as far as the disk took them
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 94377920") from exc

    monkeypatch.setattr(torch, "save", fills_the_disk)
    last = tmp_path / "last.pt"
    with pytest.raises(CheckpointError, match=rf"^cannot write checkpoint {last}: No space left on device; {last} "
                                              "from before is kept$"):  # fmt: skip
        atomic_save(payload(2.0), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no partial file left
    assert load_checkpoint(last)["model"]["w"][0] == 1.0


def test_a_folder_that_cannot_be_synced_after_the_write_is_a_checkpoint_error(tmp_path, monkeypatch):
    """The last step of a write, outside its try, raised a bare OSError: the trainer reported it as
    a run folder that cannot be written, and a PowerSGD rank failed alone before its gather."""
    import alexnet.checkpoint as checkpoint_module

    def cannot_sync(folder):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(checkpoint_module, "_sync_folder", cannot_sync)
    last = tmp_path / "last.pt"
    with pytest.raises(CheckpointError, match=rf"^checkpoint {last} was written but its folder could not be synced: "):
        atomic_save(payload(1.0), tmp_path)
    assert load_checkpoint(last)["model"]["w"][0] == 1.0


def test_load_errors_name_the_file(tmp_path):
    atomic_save(payload(1.0), tmp_path)
    good = (tmp_path / "last.pt").read_bytes()
    broken = tmp_path / "truncated.pt"
    broken.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt cannot be loaded"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match=r"missing\.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt is not a format-1 checkpoint"):
        load_checkpoint(foreign)
    # An export's .torchvision.pth read as an outdated checkpoint ("not a format-1 checkpoint").
    weights = tmp_path / "m.torchvision.pth"
    torch.save({"features.0.weight": torch.zeros(2), "features.0.bias": torch.zeros(2)}, weights)
    with pytest.raises(
        CheckpointError, match=re.escape(f"{weights} is not a checkpoint of this trainer but a weights")
    ):
        load_checkpoint(weights)


def test_a_file_that_is_no_checkpoint_says_what_it_is_in_one_line(tmp_path):
    """torch.load's multi-line messages: a TorchScript archive ("Cannot use weights_only=True with
    TorchScript archives", after a warning), a text file ("KeyError: 101"), another zip."""
    script = export_torchscript(torch.nn.Linear(2, 2), torch.ones(1, 2), tmp_path / "m.torchscript.pt")
    text = tmp_path / "metrics.jsonl"
    text.write_text('{"split": "val", "step": 7}\n')
    other_zip = tmp_path / "data.zip"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("a/b.txt", "hello")
    exported = "launch/export.py writes those from a checkpoint; name the checkpoint itself"
    for path, what in ((script, f"a TorchScript archive: {exported}"), (text, "not a PyTorch file"),
                       (other_zip, "a zip archive that torch.save did not write")):  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch.load's "dispatching to torch.jit.load" is no longer reached
            with pytest.raises(CheckpointError) as exc:
                load_checkpoint(path)
        assert str(exc.value) == f"{path} is not a checkpoint of this trainer ({what})"


def test_a_damaged_checkpoint_stays_one_that_cannot_be_loaded(tmp_path, caplog):
    """What a crash leaves of last.pt (a zip cut short, an empty or zero-filled file) is a damaged
    checkpoint, not another kind of file, and auto resume falls back from it to previous.pt."""
    atomic_save(payload(1.0), tmp_path)
    good = (tmp_path / "last.pt").read_bytes()
    atomic_save(payload(2.0), tmp_path)
    cases = {
        "cut.pt": (good[:200], "cannot be loaded (RuntimeError: PytorchStreamReader failed reading zip archive"),
        "two.pt": (good[:2], "cannot be loaded (it ends after 2 bytes: a write that was cut off)"),
        "empty.pt": (b"", "cannot be loaded (the file is empty)"),
        "zeros.pt": (bytes(4096), "cannot be loaded (it begins with zero bytes only: a write whose data did not"),
    }
    torch.save({"format": 1, "model": {"w": torch.zeros(100_000)}}, tmp_path / "big.pt")
    # The zip reader's seek back for its directory in a file cut below 64 KiB: EINVAL, once taken
    # for storage that "cannot be read"
    cases["cut_small.pt"] = ((tmp_path / "big.pt").read_bytes()[:30_000], "cannot be loaded (OSError: [Errno 22]")
    for name, (data, said) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(str(tmp_path / name))} {re.escape(said)}"):
            load_checkpoint(tmp_path / name)
    last = tmp_path / "last.pt"
    damaged, foreign = f"checkpoint {last} cannot be loaded (RuntimeError: ", f"{last} is not a checkpoint of this"
    for data, said in ((good[:200], damaged), (b'{"not": "a checkpoint"}', foreign)):
        last.write_bytes(data)
        caplog.clear()
        with pytest.raises(CheckpointError, match=r"previous\.pt has no optimizer"):  # reached: it fell back
            load_resume_checkpoint(CheckpointConfig(resume="auto"), tmp_path, torch.nn.Linear(1, 1))
        assert said in caplog.text and f"; falling back to {tmp_path / 'previous.pt'}" in caplog.text


def test_a_checkpoint_whose_bytes_changed_after_the_write_is_damaged(tmp_path, caplog):
    """One flipped bit in a tensor's bytes (a disk, a copy between clusters): torch.load does not
    check the zip's CRC-32s and loaded the changed weight without a word. It is now a damaged
    checkpoint, which auto resume falls back from to previous.pt."""
    for value in (1.0, 2.0):
        atomic_save({"format": 1, "model": {"w": torch.full((1000,), value)}}, tmp_path)
    last = tmp_path / "last.pt"
    with zipfile.ZipFile(last) as archive:
        (member,) = [info for info in archive.infolist() if info.filename.endswith("/data/0")]  # w's bytes
        start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data = bytearray(last.read_bytes())
    data[start + member.file_size // 2] ^= 0x10
    last.write_bytes(bytes(data))
    said = (f"checkpoint {last} cannot be loaded (its member {member.filename} does not match the CRC-32 stored "
            "with it: the file changed on disk or in a copy after it was written)")  # fmt: skip
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(last)
    assert str(exc.value) == said
    with pytest.raises(CheckpointError, match=r"previous\.pt has no optimizer"):  # reached: it fell back
        load_resume_checkpoint(CheckpointConfig(resume="auto"), tmp_path, torch.nn.Linear(1, 1))
    assert f"{said}; falling back to {tmp_path / 'previous.pt'}" in caplog.text


def test_weights_only_refuses_pickled_code(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "obj": torch.nn.ReLU()}, evil)  # a module needs code to unpickle
    with pytest.raises(CheckpointError, match="cannot be loaded") as exc:
        load_checkpoint(evil)
    # torch's 6 lines advised loading with weights_only=False: running the code the file holds
    assert str(exc.value) == (
        f"checkpoint {evil} cannot be loaded (it holds what weights_only=True does not load: Unsupported global: "
        "GLOBAL torch.nn.modules.activation.ReLU was not an allowed global by default)"
    )


def test_model_mismatch_is_explained(tmp_path):
    state = PaperAlexNet(10, input_size=67).state_dict()
    with pytest.raises(
        CheckpointError, match=r"ckpt\.pt does not fit this model: shape mismatch fc8\.0\.bias \(5,\) vs \(6,\)"
    ):
        load_model_state(PaperAlexNet(12, input_size=67), state, tmp_path / "ckpt.pt")


def test_optimizer_state_round_trips_by_name():
    torch.manual_seed(0)
    model = PaperAlexNet(10, input_size=67)
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.1)
    model(torch.randn(2, 3, 67, 67)).sum().backward()
    opt.step()
    momentum = optimizer_momentum(opt, {p: n for n, p in model.named_parameters()})
    groups = optimizer_hyperparams(opt)
    assert set(groups) == {"weights", "biases"} and groups["weights"]["weight_decay"] == 5e-4
    assert set(momentum) == {n for n, _ in model.named_parameters()}
    twin = PaperAlexNet(10, input_size=67)
    twin_opt = build_optimizer(list(twin.named_parameters()), OptimConfig(), lr=0.5)
    load_optimizer_state(twin_opt, groups, momentum, dict(twin.named_parameters()))
    assert [g["lr"] for g in twin_opt.param_groups] == [0.1, 0.1]
    for n, p in twin.named_parameters():
        assert torch.equal(twin_opt.state[p]["momentum_buffer"], momentum[n])
    # how the update is computed is this version's choice, not the checkpoint's: a checkpoint
    # written without the fused kernel still resumes with it
    older = {name: {**g, "fused": None, "foreach": None} for name, g in groups.items()}
    load_optimizer_state(twin_opt, older, momentum, dict(twin.named_parameters()))
    assert [g["fused"] for g in twin_opt.param_groups] == [True, True]


def test_momentum_resumes_in_the_parameters_memory_layout():
    """A checkpoint written with the other train.channels_last: the restored buffers take each
    parameter's strides, which the fused SGD needs (with a mismatch the CPU kernel computed a
    wrong update; CUDA refuses the step)."""
    torch.manual_seed(0)
    model = PaperAlexNet(10, input_size=67)  # contiguous
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.1)
    model(torch.randn(2, 3, 67, 67)).sum().backward()
    opt.step()
    momentum = optimizer_momentum(opt, {p: n for n, p in model.named_parameters()})
    groups = optimizer_hyperparams(opt)

    def resumed(fmt: torch.memory_format) -> tuple[PaperAlexNet, torch.optim.Optimizer]:
        twin = PaperAlexNet(10, input_size=67).to(memory_format=fmt)
        twin.load_state_dict(model.state_dict())
        twin_opt = build_optimizer(list(twin.named_parameters()), OptimConfig(), lr=0.1)
        load_optimizer_state(twin_opt, groups, momentum, dict(twin.named_parameters()))
        return twin, twin_opt

    cl, cl_opt = resumed(torch.channels_last)
    plain, plain_opt = resumed(torch.contiguous_format)
    conv = cl.conv1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for p in cl.parameters():
        assert cl_opt.state[p]["momentum_buffer"].stride() == p.stride()
    grads = {n: torch.randn_like(p) for n, p in plain.named_parameters()}
    for m, o in ((cl, cl_opt), (plain, plain_opt)):
        for n, p in m.named_parameters():
            p.grad = torch.empty_like(p).copy_(grads[n])  # strided as its parameter, as autograd makes it
        o.step()
    for (n, a), b in zip(cl.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


def test_optimizer_settings_come_from_this_runs_config(caplog):
    """A run resumed with optim.momentum / optim.weight_decay changed uses (and will save) the new
    values, and says so; the lr the schedule reached comes from the checkpoint."""
    model = PaperAlexNet(10, input_size=67)
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.1)
    groups = optimizer_hyperparams(opt)
    changed = OptimConfig(momentum=0.5, weight_decay=0.01)
    resumed = build_optimizer(list(model.named_parameters()), changed, lr=0.7)
    with caplog.at_level("WARNING", logger="alexnet"):
        load_optimizer_state(resumed, groups, {}, dict(model.named_parameters()))
    settings = {g["name"]: (g["lr"], g["momentum"], g["weight_decay"]) for g in resumed.param_groups}
    assert settings == {"weights": (0.1, 0.5, 0.01), "biases": (0.1, 0.5, 0.0)}
    assert optimizer_hyperparams(resumed)["weights"]["momentum"] == 0.5  # what the next checkpoint holds
    said = caplog.text
    assert "'weights': momentum is 0.5 in this run's config and 0.9 in the checkpoint" in said
    assert "'weights': weight_decay is 0.01 in this run's config and 0.0005" in said
    assert "'biases': weight_decay" not in said  # biases carry no decay in either


def test_a_write_after_a_bad_last_pt_keeps_the_good_previous_pt(tmp_path):
    atomic_save(payload(1.0), tmp_path)
    atomic_save(payload(2.0), tmp_path)
    (tmp_path / "last.pt").write_bytes(b"torn")  # last.pt did not load; the run resumed from previous.pt
    atomic_save(payload(3.0), tmp_path, rotate=False)
    assert load_checkpoint(tmp_path / "last.pt")["model"]["w"][0] == 3.0
    assert load_checkpoint(tmp_path / "previous.pt")["model"]["w"][0] == 1.0
    atomic_save(payload(4.0), tmp_path)  # later writes rotate as usual
    assert load_checkpoint(tmp_path / "previous.pt")["model"]["w"][0] == 3.0


def test_a_folder_or_an_incomplete_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a folder; name a checkpoint file in it \(e\.g\. .*last\.pt\)"):
        load_checkpoint(tmp_path)
    run = tmp_path / "run"  # a run folder: its checkpoints/last.pt, not run/last.pt, which no run has
    atomic_save(payload(1.0), run / "checkpoints")
    with pytest.raises(ConfigError, match=re.escape(f"(e.g. {run / 'checkpoints' / 'last.pt'})")):
        load_resume_checkpoint(CheckpointConfig(resume=str(run)), tmp_path, torch.nn.Linear(1, 1))
    with pytest.raises(CheckpointError, match=re.escape(f"(e.g. {run / 'checkpoints' / 'last.pt'})")):
        load_checkpoint(run)
    model = PaperAlexNet(10, input_size=67)
    sections = {"progress": {}, "optimizer": {}, "schedule": {}, "config": {}}
    atomic_save({"format": 1, "model": model.state_dict(), **sections}, tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"last\.pt has no loaders: it cannot continue a training run"):
        load_resume_checkpoint(CheckpointConfig(resume=str(tmp_path / "ck" / "last.pt")), tmp_path, model)


def test_changed_settings_lists_each_changed_key():
    saved = {"optim": {"lr": 0.01, "momentum": 0.9}, "data": {"root": "/a"}, "checkpoint": {"resume": "auto"}}
    current = {"optim": {"lr": 0.05, "momentum": 0.9}, "data": {"root": "/b"}, "checkpoint": {"resume": "/x.pt"}}
    assert changed_settings(saved, current) == ["optim.lr: 0.01 -> 0.05", "data.root: '/a' -> '/b'"]
    assert changed_settings(current, current) == []


def test_a_batch_change_names_the_checkpoint_s_own_peak_learning_rate():
    """2 processes at optim.lr 0.01 (global batch 16: peak 0.00125) resumed on 1 with optim.lr 0.02
    was logged as "its peak learning rate 0.0025 -> 0.00125": the old peak from the new lr."""
    cfg = Config(optim=OptimConfig(lr=0.02, lr_reference_batch=128), data=DataConfig(batch_size=8))
    saved = {"optim": {"lr": 0.01, "lr_reference_batch": 128}, "data": {"batch_size": 8}}
    line = batch_change({"global_batch": 16}, saved, cfg, 8)
    assert line == ["global batch: 16 -> 8 (2 -> 1 data-parallel replicas), its peak learning rate 0.00125 -> 0.00125"]
    assert batch_change({"global_batch": 16}, {}, cfg, 8)[0].endswith("0.0025 -> 0.00125")  # no keys: this run's
    assert batch_change({"global_batch": 8}, saved, cfg, 8) == [] and batch_change(None, {}, cfg, 8) == []


def test_a_batch_change_names_its_cause():
    """data.batch_size 16 -> 8 on the same 2 ranks was put down to "world size and layout"."""
    cfg = Config(data=DataConfig(batch_size=8))
    saved, under = {"data": {"batch_size": 16}}, {"global_batch": 32}
    assert batch_change(under, saved, cfg, 16)[0].startswith("global batch: 32 -> 16 (data.batch_size 16 -> 8), ")
    both = "global batch: 32 -> 24 (2 -> 3 data-parallel replicas, data.batch_size 16 -> 8), "
    assert batch_change(under, saved, cfg, 24)[0].startswith(both)
    # A session that took no step saved its config (batch 16) all the same: the steps were taken at 8.
    under = {"global_batch": 8, "batch_size": 8}
    assert batch_change(under, saved, Config(data=DataConfig(batch_size=16)), 16)[0].startswith(
        "global batch: 8 -> 16 (data.batch_size 8 -> 16), "
    )


def test_model_init_is_no_changed_setting_on_resume():
    """The weights come from the checkpoint; configs written before model.init had "auto" say "paper"."""
    saved = {"model": {"variant": "paper", "init": "paper"}, "train": {"epochs": 1}}
    current = {"model": {"variant": "paper", "init": "auto"}, "train": {"epochs": 2}}
    assert changed_settings(saved, current) == ["train.epochs: 1 -> 2"]


def test_run_name_resume_and_init_are_no_changed_settings_on_resume():
    """Whole configs as the trainer compares them (config_to_dict): run.name names the run's
    folder, which configs written before it was resolved saved as ""; checkpoint.resume names
    this very checkpoint; model.init's weights come from it. A resume differing only in those
    reports nothing; one that also doubles the epochs reports exactly that."""
    saved = config_to_dict(load_config(None, ["run.name=", "checkpoint.resume=auto", "model.init=paper"]))
    overrides = ["run.name=imagenet-8gpu", "checkpoint.resume=runs/x/checkpoints/last.pt", "model.init=auto"]
    assert changed_settings(saved, config_to_dict(load_config(None, overrides))) == []
    saved["train"]["epochs"] = 2
    current = config_to_dict(load_config(None, [*overrides, "train.epochs=4"]))
    assert changed_settings(saved, current) == ["train.epochs: 2 -> 4"]


def test_a_key_the_checkpoints_config_lacks_counts_as_its_default():
    """A checkpoint written before a key existed ran with its default: "model.fc_width: None ->
    4096" was reported as a change on every resume of such a checkpoint."""
    saved = {"model": {"variant": "paper"}, "train": {"epochs": 1}}
    assert changed_settings(saved, {"model": {"variant": "paper", "fc_width": 4096}, "train": {"epochs": 1}}) == []
    assert changed_settings(saved, {"model": {"variant": "paper", "fc_width": 512}}) == ["model.fc_width: 4096 -> 512"]


def test_a_resume_of_the_run_s_own_checkpoint_keeps_how_the_run_began(tmp_path):
    """model.init (and model.weights) of the checkpoint, whatever the command says: a resume with
    model.init=paper recorded `paper` for weights initialised with kaiming. A session resuming
    `auto` keeps the other run's checkpoint the run started from; one of the run's own is not
    a start (a session sent back to previous.pt)."""
    ckpt_dir = tmp_path / "run" / "checkpoints"
    started = config_to_dict(load_config(None, ["model.init=kaiming", f"checkpoint.resume={tmp_path / 'a.pt'}"]))
    now = load_config(None, ["model.init=paper"])
    kept = kept_on_resume(now, started, ckpt_dir)
    assert (kept.model.init, kept.checkpoint.resume) == ("kaiming", str(tmp_path / "a.pt"))
    went_back = config_to_dict(load_config(None, [f"checkpoint.resume={ckpt_dir / 'previous.pt'}"]))
    assert kept_on_resume(now, went_back, ckpt_dir).checkpoint.resume == "auto"
    named = load_config(None, [f"checkpoint.resume={ckpt_dir / 'previous.pt'}"])  # the command's own choice
    assert kept_on_resume(named, started, ckpt_dir).checkpoint.resume == str(ckpt_dir / "previous.pt")
    assert kept_on_resume(now, {"model": {"init": "bogus"}}, ckpt_dir).model.init == "paper"


def test_weights_that_do_not_fit_name_the_settings_this_run_changes(tmp_path):
    """A resume under another model.fc_width (or crop, classes, variant) failed with the shape
    list alone; the error now names the settings that shape the model and differ."""
    saved = load_config(None, ["data.crop=67", "data.resize=76"])
    sections = {"progress": {}, "optimizer": {}, "schedule": {}, "loaders": {}, "config": config_to_dict(saved)}
    atomic_save({"format": 1, "model": PaperAlexNet(10, input_size=67).state_dict(), **sections}, tmp_path / "ck")
    run = load_config(None, ["data.crop=67", "data.resize=76", "model.fc_width=512", "optim.lr=0.5"])
    narrow = PaperAlexNet(10, input_size=67, fc_width=512)
    resume = CheckpointConfig(resume=str(tmp_path / "ck" / "last.pt"))
    named = r"does not fit this model: shape mismatch fc6\.0\.bias .*\(this run changes model\.fc_width: 4096 -> 512; "
    with pytest.raises(ConfigError, match=named) as info:  # the command's fault (exit 2)
        load_resume_checkpoint(resume, tmp_path, narrow, config_to_dict(run))
    assert info.value.keys == ("model.fc_width",)


def test_a_model_changed_by_the_command_does_not_fall_back_to_previous_pt(tmp_path, caplog):
    """resume=auto with another model.fc_width: last.pt was called unusable and previous.pt tried
    (the same mismatch), then the run exited 1 as if its checkpoints were damaged."""
    saved = load_config(None, ["data.crop=67", "data.resize=76"])
    sections = {"progress": {}, "optimizer": {}, "schedule": {}, "loaders": {}, "config": config_to_dict(saved)}
    for _ in range(2):
        atomic_save({"format": 1, "model": PaperAlexNet(10, input_size=67).state_dict(), **sections}, tmp_path)
    run = load_config(None, ["data.crop=67", "data.resize=76", "model.fc_width=512"])
    narrow = PaperAlexNet(10, input_size=67, fc_width=512)
    with caplog.at_level(logging.WARNING, logger="alexnet"), pytest.raises(ConfigError, match=r"last\.pt does not fit"):
        load_resume_checkpoint(CheckpointConfig(resume="auto"), tmp_path, narrow, config_to_dict(run))
    assert "falling back" not in caplog.text


def test_previous_pt_is_copied_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")  # vfat, some FUSE mounts

    monkeypatch.setattr(os, "link", no_links)
    atomic_save({"step": 1}, tmp_path)
    atomic_save({"step": 2}, tmp_path)
    assert torch.load(tmp_path / "previous.pt", weights_only=True) == {"step": 1}
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]

    def broken(source, target):
        raise OSError(errno.EIO, "Input/output error")  # a real failure is not papered over

    monkeypatch.setattr(os, "link", broken)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last\.pt: Input/output error; .* is kept$"):
        atomic_save({"step": 3}, tmp_path)
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]  # no temporary left

    def copy_fills_the_disk(source, target):
        with open(target, "wb") as f:
            f.write(b"part of a copy")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(shutil, "copyfile", copy_fills_the_disk)
    with pytest.raises(CheckpointError, match=r"last\.pt: No space left on device; .* is kept$"):
        atomic_save({"step": 3}, tmp_path)
    # Neither the new checkpoint nor previous.pt's partial copy is left on the full disk.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]


def test_progress_fields_of_a_newer_version_are_named_and_left_out(tmp_path, caplog):
    """A checkpoint written by a newer version, whose progress has a field this one lacks: the
    resume went down with a TypeError from the dataclass; the field is now named and left out."""
    from alexnet.resume import progress_from_checkpoint

    saved = {"epoch": 3, "step": 60, "epoch_trained": True, "future_counter": 7}
    with caplog.at_level("WARNING", logger="alexnet"):
        progress = progress_from_checkpoint(saved, tmp_path / "last.pt")
    assert (progress.epoch, progress.step, progress.epoch_trained) == (3, 60, True)
    assert "left out: future_counter" in caplog.text and str(tmp_path / "last.pt") in caplog.text


@pytest.mark.dali
def test_a_resume_puts_back_torch_s_generator_as_the_checkpoint_has_it(tiny_data, tmp_path, monkeypatch):
    """The checkpoint held torch's RNG state, which no resume read (the run's own randomness comes
    from seeds and counters, so it showed only where the model's init drew otherwise: another
    train.seed). Read inside the run, as the resume has put it back: at the run's end the
    caller's own state returns (tests/test_process.py)."""
    from _helpers import TINY_TRAIN

    import alexnet.resume as resume
    from alexnet.config import load_config
    from alexnet.run import run_training

    cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=rng",
                             "train.max_steps=2"])  # fmt: skip
    run_training(cfg, None)
    saved = torch.load(tmp_path / "rng" / "checkpoints" / "last.pt", weights_only=True)["rng"]["torch"]
    again = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=rng",
                               "train.max_steps=2", "train.seed=7"])  # fmt: skip
    seen, restore_loader = [], resume.restore_loader

    def noting(*args, **kwargs):  # the resume's next step after the generator's
        seen.append(torch.get_rng_state())
        return restore_loader(*args, **kwargs)

    monkeypatch.setattr(resume, "restore_loader", noting)
    run_training(again, None)  # resumed at step 2, nothing to train
    assert len(seen) == 1 and torch.equal(seen[0], saved)


def test_a_last_pt_that_may_be_whole_is_not_passed_over_for_previous_pt(tmp_path, monkeypatch):
    """Auto resume fell back to previous.pt from a last.pt this user may not read, one of a newer
    format, a link into storage not mounted, or a folder, and its run's first write replaced the
    intact newer checkpoint (or, for the folder, failed a checkpoint interval later)."""
    atomic_save(payload(1.0), tmp_path)
    atomic_save(payload(2.0), tmp_path)
    last, auto = tmp_path / "last.pt", CheckpointConfig(resume="auto")
    refused = "; not resuming from {} instead, whose run would replace it at its next checkpoint".format(
        tmp_path / "previous.pt"
    )

    def unreadable(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    with monkeypatch.context() as patch:  # root reads any file: the refusal is made for it
        patch.setattr("builtins.open", unreadable)
        with pytest.raises(CheckpointUnusableHere, match=re.escape(f"{last} cannot be read: Permission denied")) as e:
            load_resume_checkpoint(auto, tmp_path, torch.nn.Linear(1, 1))
    assert refused in str(e.value)

    def disk_error(path, *args, **kwargs):
        if str(path) == str(last):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_open(path, *args, **kwargs)

    real_open = open
    with monkeypatch.context() as patch:  # a read error of the disk is damage: previous.pt is used
        patch.setattr("builtins.open", disk_error)
        with pytest.raises(CheckpointError, match=r"previous\.pt has no optimizer"):
            load_resume_checkpoint(auto, tmp_path, torch.nn.Linear(1, 1))

    def lost_mid_read(*args, **kwargs):  # the head read, then the storage went (a lost NFS handle)
        raise OSError(errno.ESTALE, "Stale file handle", str(last))

    with monkeypatch.context() as patch:  # fell back to previous.pt: a damaged last.pt, it said
        patch.setattr(torch, "load", lost_mid_read)
        with pytest.raises(CheckpointUnusableHere, match=re.escape(f"{last} cannot be read: Stale file handle")):
            load_resume_checkpoint(auto, tmp_path, torch.nn.Linear(1, 1))
        patch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
        with pytest.raises(MemoryError):
            load_resume_checkpoint(auto, tmp_path, torch.nn.Linear(1, 1))
    newer = {**payload(2.0), "format": 2}
    torch.save(newer, last)
    with pytest.raises(CheckpointUnusableHere, match="is of format 2, written by a newer version") as e:
        load_resume_checkpoint(auto, tmp_path, torch.nn.Linear(1, 1))
    assert refused in str(e.value)
    last.unlink()
    last.symlink_to(tmp_path / "unmounted" / "last.pt")
    with pytest.raises(CheckpointUnusableHere, match=r"last\.pt is a link to .*unmounted/last\.pt, which is not there"):
        load_resume_checkpoint(auto, tmp_path, torch.nn.Linear(1, 1))
    (tmp_path / "previous.pt").unlink()  # alone, the link is still a checkpoint: no fresh start over it
    with pytest.raises(CheckpointUnusableHere, match="which is not there"):
        load_resume_checkpoint(auto, tmp_path, torch.nn.Linear(1, 1))
    last.unlink()
    last.mkdir()
    with pytest.raises(CheckpointUnusableHere, match=r"last\.pt is a folder, where the run writes its checkpoint"):
        load_resume_checkpoint(auto, tmp_path, torch.nn.Linear(1, 1))


@pytest.mark.dali
def test_a_restart_of_a_session_sent_back_to_its_own_previous_pt_continues(tiny_data, tmp_path, capfd):
    """checkpoint.resume=<the run's own previous.pt> goes back one checkpoint; the same command
    again (torchrun's restart, a Slurm requeue) went back again each time, losing a checkpoint
    interval and its records at every restart."""
    from _helpers import TINY_TRAIN

    from alexnet.run import run_training

    def run(*extra: str) -> None:
        run_training(load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}",
                                        "run.name=back", "checkpoint.every_steps=2", *extra]), None)  # fmt: skip

    def step(name: str) -> int:
        return torch.load(tmp_path / "back" / "checkpoints" / name, weights_only=True)["progress"]["step"]

    run("train.max_steps=4")
    back = f"checkpoint.resume={tmp_path / 'back' / 'checkpoints' / 'previous.pt'}"
    capfd.readouterr()
    run(back, "train.max_steps=6")  # from step 2, as asked (the run's log goes to stderr)
    assert "after step 2 " in capfd.readouterr().err and (step("last.pt"), step("previous.pt")) == (6, 4)
    run(back, "train.max_steps=8")  # the same command again: from step 6, not 4
    said = capfd.readouterr().err
    assert "the run's latest checkpoint was written after going back to" in said and "after step 6 " in said
    assert (step("last.pt"), step("previous.pt")) == (8, 6)
    # A restart that died before its first checkpoint had rewritten config.yaml, newer than last.pt:
    # told by the files' times, the next restart went back again. The checkpoint's own config tells.
    later = (tmp_path / "back" / "config.yaml").stat().st_mtime + 60
    os.utime(tmp_path / "back" / "config.yaml", (later, later))
    run(back, "train.max_steps=10")
    assert "after step 8 " in capfd.readouterr().err and (step("last.pt"), step("previous.pt")) == (10, 8)


@pytest.mark.dali
def test_a_checkpoint_folder_that_cannot_be_written_stops_the_run_at_its_start(tiny_data, tmp_path, monkeypatch):
    """A read-only checkpoints/ was found at the first checkpoint write, checkpoint.every_steps
    steps (maybe an epoch) of training later, and stopped the run with exit 1."""
    from _helpers import TINY_TRAIN

    from alexnet.run import run_training

    real_temporary_file = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):  # noqa: A002 - TemporaryFile's own keyword
        if dir is not None and Path(dir).name == "checkpoints":  # root writes anywhere: refused for it
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_temporary_file(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    cfg = load_config(None, [*TINY_TRAIN, f"data.root={tiny_data}", f"run.root={tmp_path}", "run.name=ro"])
    with pytest.raises(ConfigError, match=r"config key 'run\.root': cannot write the run folder .*/ro \(.*/ro/"
                                          r"checkpoints: Permission denied\)"):  # fmt: skip
        run_training(cfg, None)
    assert not (tmp_path / "ro" / "metrics.jsonl").exists()  # no step was trained
