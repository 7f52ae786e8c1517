"""Micro-benchmarks behind the CPU tuning choices, each interleaved in one process.

  python launch/microbench.py lrn-chunks [--batch 32]
      forward + backward of the paper model's two LRN layers for several CPU chunk budgets
      (alexnet.layers.CPU_CHUNK_BYTES) and for the whole batch at once
  python launch/microbench.py lrn-step --reference-layers FILE [--batch 32]
      paper-model training steps with this checkout's LRN and with the LRN of another version's
      alexnet/layers.py (e.g. `git show 47fe204:alexnet/layers.py > /tmp/layers_47fe204.py`)
  python launch/microbench.py sgd-step [--batch 32]
      training steps with the fused SGD that alexnet.optim builds and with PyTorch's default CPU
      SGD, for the paper model and torchvision.models.alexnet
  python launch/microbench.py lrn-floor [--batch 32]
      paper-model training steps with its LRN and with the LRN replaced by the identity (the
      floor that no LRN implementation can beat), against torchvision.models.alexnet

Each prints the median over rounds (the order of A and B alternates every round) and, for the
A/B commands, the median of the per-round ratios with its range: with few rounds it can differ
from the ratio of the two medians printed above it. Host memory and cuDNN/oneDNN settings are
the trainer's (alexnet.process). Times are wall-clock on whatever else the machine is doing:
compare only figures from one run.
"""
# ruff: noqa: E402 - Ctrl-C is made quiet before the imports

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below take seconds, and a Ctrl-C during them is one line too
    from alexnet.interrupt import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting()

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

from alexnet import layers
from alexnet.config import OptimConfig, TrainConfig
from alexnet.model import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, PAPER_INPUT, build_model
from alexnet.optim import IMPLEMENTATION_KEYS, build_optimizer
from alexnet.process import apply_process_settings, print_error, run_command

# The paper model's LRN inputs: conv1's ReLU (96 x 55 x 55) and conv2's (256 x 27 x 27), two towers.
LRN_SHAPES = ((96, 55), (256, 27))
TOWERS = 2


class ReferenceLayersError(ValueError):
    """A --reference-layers file that is missing or lacks what the command takes from it."""


def positive_int(text: str) -> int:
    """An argparse type for a count or size: 0 rounds left no times to take a median of, a batch
    of 0 timed empty steps and printed their ratio, and a negative batch failed deep in torch."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def timed(fn: Callable[[], None], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def interleave(contenders: dict[str, Callable[[], None]], rounds: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each contender in each round, the order reversed every other round,
    after one untimed call of each."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(timed(contenders[name], repeats))
    return times


def report_ab(times: dict[str, list[float]], a: str, b: str) -> None:
    for name, values in times.items():
        print(f"  {name:40s} {1e3 * statistics.median(values):8.1f} ms")
    report_ratio(times, a, b)


def report_ratio(times: dict[str, list[float]], a: str, b: str) -> None:
    print(format_ratio(times, a, b))


def format_ratio(times: dict[str, list[float]], a: str, b: str) -> str:
    """How much faster `a` is than `b`: the median of the per-round ratios (the project's speed
    figure: each round's pair ran under the same load), named as such, because with few rounds it
    can disagree with the ratio of the medians printed above it (1.201x next to 1396 vs 1352 ms)."""
    ratios = [tb / ta for ta, tb in zip(times[a], times[b])]
    spread = f"per round {min(ratios):.3f}-{max(ratios):.3f}" if len(ratios) > 1 else "a single round"
    return f"  {a} is {statistics.median(ratios):.3f}x as fast as {b} (median of the per-round ratios; {spread})"


def swapped(owner: object, name: str, value: object, run: Callable[[], None]) -> Callable[[], None]:
    """`run` with `owner.name` set to `value`, put back afterwards (also when `run` fails)."""

    def call() -> None:
        kept = getattr(owner, name)
        setattr(owner, name, value)
        try:
            run()
        finally:
            setattr(owner, name, kept)

    return call


def lrn_pass(lrn: nn.Module, inputs: list[Tensor], grads: list[Tensor]) -> Callable[[], None]:
    def run() -> None:
        for x, g in zip(inputs, grads):
            leaf = x.detach().requires_grad_()
            lrn(leaf, TOWERS).backward(g)

    return run


def chunk_budgets(inputs: list[Tensor]) -> dict[str, int]:
    """The budgets to time, named with the samples per chunk they give each LRN layer's input;
    budgets that chunk both alike are one row (one conv1 sample is 1.16 MB: 512 KiB and 1 MiB
    both give chunks of one sample, and at batch 1 every budget gives the whole batch)."""
    rows: dict[tuple[int, ...], list[str]] = {}
    sizes: dict[tuple[int, ...], int] = {}
    budgets = {f"{b >> 10} KiB": b for b in (1 << 19, 1 << 20, 2 << 20, 4 << 20, 8 << 20)}
    budgets["whole batch"] = 1 << 62
    for name, budget in budgets.items():
        chunk: list[int] = []
        swapped(layers, "CPU_CHUNK_BYTES", budget, lambda out=chunk: out.extend(map(layers.lrn_batch_chunk, inputs)))()
        chunks = tuple(min(c, len(x)) for c, x in zip(chunk, inputs))
        rows.setdefault(chunks, []).append(name)
        sizes.setdefault(chunks, budget)
    return {f"{' = '.join(names)} ({'/'.join(map(str, chunks))})": sizes[chunks] for chunks, names in rows.items()}


def lrn_chunks(batch: int, rounds: int) -> None:
    torch.manual_seed(0)
    shapes = [(batch, c, side, side) for c, side in LRN_SHAPES]
    inputs = [(torch.randn(s) * 30).relu_().contiguous(memory_format=torch.channels_last) for s in shapes]
    grads = [torch.randn_like(x) for x in inputs]
    lrn = layers.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)
    budgets = chunk_budgets(inputs)
    chosen = layers.CPU_CHUNK_BYTES

    run = lrn_pass(lrn, inputs, grads)
    times = interleave({name: swapped(layers, "CPU_CHUNK_BYTES", b, run) for name, b in budgets.items()}, rounds, 1)
    print(f"LRN forward + backward, both layers, batch {batch}, channels_last (chosen: {chosen >> 10} KiB); "
          "in brackets: samples per chunk of the conv1/conv2 LRN")  # fmt: skip
    width = max(map(len, times))
    for name, values in times.items():
        print(f"  {name:{width}s} {1e3 * statistics.median(values):8.1f} ms (min {1e3 * min(values):.1f})")


def load_layers(path: Path, needed: str):
    """Another version's alexnet/layers.py as a module of its own, checked to define `needed`
    (any Python file loads: without the check, the wrong one failed later as a traceback)."""
    spec = importlib.util.spec_from_file_location("reference_layers", path)
    if not path.is_file() or spec is None or spec.loader is None:
        raise ReferenceLayersError(f"--reference-layers {path}: no such Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)  # runs the file's top level, as importing it would
    except (Exception, SystemExit) as exc:  # a syntax error, a script that is no module
        raise ReferenceLayersError(
            f"--reference-layers {path}: cannot be loaded as a module ({type(exc).__name__}: {exc})"
        ) from exc
    if not hasattr(module, needed):
        raise ReferenceLayersError(f"--reference-layers {path}: defines no {needed} (not an alexnet/layers.py?)")
    return module


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batch: int) -> Callable[[], None]:
    images = torch.randn(batch, 3, PAPER_INPUT, PAPER_INPUT).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def frozen_steps(model: nn.Module, batch: int) -> Callable[[], None]:
    """Training steps with the project's optimizer at learning rate 0: the weights stay put, so
    every round times the same arithmetic."""
    return train_steps(model, build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.0), batch)


def paper_model() -> nn.Module:
    return build_model("paper", 1000, input_size=PAPER_INPUT).to(memory_format=torch.channels_last).train()


def lrn_step(batch: int, rounds: int, reference: Path) -> None:
    other = load_layers(reference, "LocalResponseNorm")  # first: a wrong file is refused before the model is built
    torch.manual_seed(0)
    model = paper_model()
    step = frozen_steps(model, batch)
    lrns = {
        "this checkout's LRN": layers.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K),
        f"LRN of {reference}": other.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K),
    }
    times = interleave({name: swapped(model, "lrn", lrn, step) for name, lrn in lrns.items()}, rounds, repeats=3)
    print(f"paper-model training step, batch {batch}, {PAPER_INPUT} px, channels_last, lr 0")
    report_ab(times, *lrns)


class IdentityLRN(nn.Module):
    """Stands in for the paper model's LRN at no cost."""

    def forward(self, x: Tensor, groups: int = 1) -> Tensor:  # noqa: ARG002 - the LRN's signature
        return x


def torchvision_model() -> nn.Module:
    return torchvision.models.alexnet().to(memory_format=torch.channels_last).train()


def lrn_floor(batch: int, rounds: int) -> None:
    """How close the paper model can come to torchvision's AlexNet by making its LRN faster: with
    the LRN free, what is left is the rest of the paper's architecture (conv1's 96 kernels where
    torchvision has 64, 256 conv2 kernels for 192, ...)."""
    torch.manual_seed(0)
    paper, reference = paper_model(), torchvision_model()
    paper_step = frozen_steps(paper, batch)
    contenders = {
        "paper": paper_step,
        "paper, LRN = identity": swapped(paper, "lrn", IdentityLRN(), paper_step),
        "torchvision.models.alexnet": frozen_steps(reference, batch),
    }
    times = interleave(contenders, rounds, repeats=3)
    print(f"training step, batch {batch}, {PAPER_INPUT} px, channels_last, lr 0")
    report_ab(times, "paper", "torchvision.models.alexnet")
    report_ratio(times, "paper, LRN = identity", "torchvision.models.alexnet")


def default_sgd_like(fused: torch.optim.SGD) -> torch.optim.SGD:
    """The same parameter groups and hyperparameters on PyTorch's default path (per tensor on a CPU)."""
    groups = [{k: v for k, v in g.items() if k not in IMPLEMENTATION_KEYS} for g in fused.param_groups]
    return torch.optim.SGD(groups)


def sgd_step(batch: int, rounds: int) -> None:
    builders = {
        "paper": paper_model,
        "torchvision.models.alexnet": torchvision_model,
    }
    for variant, build in builders.items():
        torch.manual_seed(0)
        model = build().train()
        fused = build_optimizer(list(model.named_parameters()), OptimConfig(), lr=0.0)
        default = default_sgd_like(fused)
        contenders = {
            f"{variant}, fused SGD": train_steps(model, fused, batch),
            f"{variant}, default SGD": train_steps(model, default, batch),
        }
        times = interleave(contenders, rounds, repeats=3)
        print(f"{variant} training step, batch {batch}, {PAPER_INPUT} px, channels_last, lr 0")
        report_ab(times, *contenders)


# Each command's one-line description and default rounds (lrn-chunks times up to six cheap contenders).
COMMANDS = {
    "lrn-chunks": ("both LRN layers, forward + backward, for several CPU chunk budgets", 13),
    "lrn-step": ("paper-model training steps with this checkout's LRN and with another version's", 9),
    "sgd-step": ("training steps with the fused SGD and with PyTorch's default CPU SGD", 9),
    "lrn-floor": ("paper-model training steps with its LRN and with it free, against torchvision's", 9),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (summary, rounds) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        p.add_argument("--batch", type=positive_int, default=32, help="images per batch, >= 1 (default 32)")
        p.add_argument(
            "--rounds",
            type=positive_int,
            default=rounds,
            help=f"timed rounds, >= 1; the order of the contenders alternates every round (default {rounds})",
        )
        if name == "lrn-step":
            p.add_argument(
                "--reference-layers",
                type=Path,
                required=True,
                metavar="FILE",
                help="another version's alexnet/layers.py, whose LocalResponseNorm is timed against this one's "
                "(required, no default)",
            )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_process_settings(TrainConfig())  # the trainer's defaults
    try:
        if args.command == "lrn-chunks":
            lrn_chunks(args.batch, args.rounds)
        elif args.command == "lrn-step":
            lrn_step(args.batch, args.rounds, args.reference_layers)
        elif args.command == "sgd-step":
            sgd_step(args.batch, args.rounds)
        else:
            lrn_floor(args.batch, args.rounds)
    except ReferenceLayersError as exc:  # a bad argument argparse cannot check: its exit status
        print_error(str(exc))
        return 2
    return 0


if __name__ == "__main__":
    run_command(main)
