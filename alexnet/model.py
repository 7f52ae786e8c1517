"""Single-device AlexNet, in two variants.

* ``paper``: Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional
  Neural Networks", NIPS 2012. The two GPU towers of figure 2 are written out: every layer is a
  pair of modules (one per tower) and the points where the paper's GPUs communicate are calls to
  ``self.exchange``, a concatenation on one device. Splitting the model over two ranks
  (``alexnet.parallel.towers``) keeps one tower's modules and swaps ``exchange`` for an
  all-gather; it is a transformation of this module, not a second model.
* ``torchvision`` (``alexnet/torchvision_variant.py``, imported when built): the single-tower
  variant of "One weird trick" (Krizhevsky 2014) with parameter names identical to
  ``torchvision.models.alexnet``, so weights move between the two freely (at torchvision's
  ``fc_width``, 4096).

Both expose ``forward_features`` (pixels -> flattened pool5, 9216 values at 227x227) and ``forward_head``
(fc6..fc8), the seam at which the 2014 hybrid layout splits data- from model-parallelism.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from alexnet.layers import CounterDropout, LocalResponseNorm

Variant = Literal["paper", "torchvision"]
Init = Literal["auto", "paper", "kaiming"]  # auto: the variant's own (section 5's; torchvision's)

# Section 3.3: k = 2, n = 5, alpha = 1e-4, beta = 0.75 with
#   b = a / (k + alpha * sum_{5 neighbours} a^2) ** beta,
# alpha taken literally (torch.nn.LocalResponseNorm and Caffe divide it by n).
LRN_SIZE = 5
LRN_ALPHA = 1e-4
LRN_BETA = 0.75
LRN_K = 2.0

PAPER_INPUT = 227
# Section 3.5: "The fully-connected layers have 4096 neurons each" (fc6 and fc7).
FC_WIDTH = 4096
TOWERS = (0, 1)
DROPOUT_STREAMS = {"fc6": 6, "fc7": 7}

# The points of figure 2 where the two GPUs exchange activations.
EXCHANGE_POINTS = ("conv3_input", "fc6_input", "fc7_input", "fc8_input", "logits")
Exchange = Callable[[Sequence[Tensor], str], Tensor]


def concat_towers(parts: Sequence[Tensor], point: str) -> Tensor:  # noqa: ARG001 - same on every point
    """Where the paper's GPUs exchange activations, one device just concatenates channels."""
    return torch.cat(list(parts), dim=1)


def pool5_size(input_size: int) -> int:
    """Side of the paper model's pool5 map: 6 at 227, the input at which conv1 gives the 55x55
    maps of section 3.5 (the paper says 224: 55 in cuda-convnet, which rounds sizes up, 54 and a 5x5
    pool5 in PyTorch, which rounds down). fc6's fan-in follows it, so a
    smaller input gives a smaller fc6 instead of features copied up to 6x6 (which would multiply
    fc6's effective learning rate by the number of copies)."""
    side = (input_size - 11) // 4 + 1  # conv1: 11x11, stride 4, no padding
    for _ in range(3):  # three overlapping 3x3 stride-2 poolings; conv2..conv5 keep the size
        side = (side - 3) // 2 + 1
    if side < 1:
        raise ValueError(f"input size {input_size} is below the smallest the paper model allows (67)")
    return side


def fc_width_fits(variant: str, fc_width: int) -> bool:
    """Whether `variant` can have fc6 and fc7 `fc_width` wide: the paper model's towers hold half
    of each layer, so its width is even."""
    return fc_width >= 1 and (variant != "paper" or fc_width % 2 == 0)


def split_classes(num_classes: int) -> tuple[int, int]:
    """fc8 is split between the towers (500 + 500 logits at 1000 classes)."""
    first = (num_classes + 1) // 2
    return first, num_classes - first


class PaperAlexNet(nn.Module):
    """AlexNet as in Krizhevsky et al. 2012: 60,965,224 parameters at 1000 classes. `fc_width`:
    the neurons of fc6 and fc7, half in each tower (the paper's 4096; fewer for small datasets)."""

    def __init__(
        self,
        num_classes: int = 1000,
        dropout: float = 0.5,
        input_size: int = PAPER_INPUT,
        init: Init = "paper",
        fc_width: int = FC_WIDTH,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not fc_width_fits("paper", fc_width):
            raise ValueError(f"fc_width must be even (half in each tower) and >= 2, got {fc_width}")
        self.num_classes = num_classes
        self.input_size = input_size
        side = pool5_size(input_size)
        pair = range(len(TOWERS))
        # Section 3.5: conv widths 48/128/192/192/128 per tower; conv3 and the FC layers read
        # both towers, conv2/conv4/conv5 only their own.
        self.conv1 = nn.ModuleList(nn.Conv2d(3, 48, 11, stride=4) for _ in pair)
        self.conv2 = nn.ModuleList(nn.Conv2d(48, 128, 5, padding=2) for _ in pair)
        self.conv3 = nn.ModuleList(nn.Conv2d(256, 192, 3, padding=1) for _ in pair)
        self.conv4 = nn.ModuleList(nn.Conv2d(192, 192, 3, padding=1) for _ in pair)
        self.conv5 = nn.ModuleList(nn.Conv2d(192, 128, 3, padding=1) for _ in pair)
        self.fc6 = nn.ModuleList(nn.Linear(256 * side * side, fc_width // 2) for _ in pair)
        self.fc7 = nn.ModuleList(nn.Linear(fc_width, fc_width // 2) for _ in pair)
        self.fc8 = nn.ModuleList(nn.Linear(fc_width, n) for n in split_classes(num_classes))
        # Section 3.3: LRN after the ReLU of conv1 and conv2, within each tower's own kernels.
        self.lrn = LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)
        # Section 3.4: overlapping pooling, z = 3, s = 2.
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)
        # Section 4.2: dropout 0.5 "in the first two fully-connected layers", setting "the output
        # of each hidden neuron" to zero: the outputs of fc6 and fc7 (as Caffe's bvlc_alexnet),
        # not their inputs (torchvision's placement, kept in the torchvision variant).
        self.drop6 = CounterDropout(dropout, DROPOUT_STREAMS["fc6"])
        self.drop7 = CounterDropout(dropout, DROPOUT_STREAMS["fc7"])
        self.towers: tuple[int, ...] = TOWERS
        self.exchange: Exchange = concat_towers
        init_weights(self, "paper" if init == "auto" else init)

    def _both_towers_here(self) -> bool:
        return self.towers == TOWERS and self.exchange is concat_towers

    def _fused_features(self, x: Tensor) -> Tensor:
        """Both towers on one device as one network with grouped convolutions: the same arithmetic
        as the written-out towers (tested), with half the convolution calls (about 20% faster on
        a CPU). Channels are ordered tower 0 then tower 1, as the exchanges concatenate them."""

        def fused(layers: nn.ModuleList) -> tuple[Tensor, Tensor]:
            return torch.cat([m.weight for m in layers]), torch.cat([m.bias for m in layers])

        groups = len(TOWERS)
        h = F.relu_(F.conv2d(x, *fused(self.conv1), stride=4))
        h = self.pool(self.lrn(h, groups))
        h = F.relu_(F.conv2d(h, *fused(self.conv2), padding=2, groups=groups))
        h = self.pool(self.lrn(h, groups))
        h = F.relu_(F.conv2d(h, *fused(self.conv3), padding=1))  # conv3 reads both towers
        h = F.relu_(F.conv2d(h, *fused(self.conv4), padding=1, groups=groups))
        h = F.relu_(F.conv2d(h, *fused(self.conv5), padding=1, groups=groups))
        return torch.flatten(self.pool(h), 1)

    def _conv1_2(self, t: int, x: Tensor) -> Tensor:
        h = self.pool(self.lrn(F.relu(self.conv1[t](x))))
        return self.pool(self.lrn(F.relu(self.conv2[t](h))))

    def _conv3_5(self, t: int, x: Tensor) -> Tensor:
        h = F.relu(self.conv3[t](x))
        h = F.relu(self.conv4[t](h))
        return torch.flatten(self.pool(F.relu(self.conv5[t](h))), 1)

    def check_input(self, x: Tensor) -> None:
        """fc6's fan-in is fixed by input_size: a batch of another size (224 for a model of 227)
        failed in fc6 with "mat1 and mat2 shapes cannot be multiplied", an unbatched image in the
        LRN. Sizes giving the same pool5 (227 to 230) are all right."""
        side = pool5_size(self.input_size)
        if x.dim() != 4 or x.shape[1] != 3 or any(n < 67 or pool5_size(n) != side for n in x.shape[-2:]):
            raise ValueError(
                f"the paper model built for input_size={self.input_size} (its data.crop) takes batches "
                f"[N, 3, H, W] with H and W giving a {side}x{side} pool5, as {self.input_size} does; "
                f"got {tuple(x.shape)}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if self._both_towers_here():
            return self._fused_features(x)
        x3 = self.exchange([self._conv1_2(t, x) for t in self.towers], "conv3_input")
        # Each tower's pool5 is flattened channel-major, so concatenating the flat halves equals
        # flattening the concatenated feature maps.
        return self.exchange([self._conv3_5(t, x3) for t in self.towers], "fc6_input")

    def forward_head(self, z: Tensor) -> Tensor:
        # Dropped after the exchange: the mask covers the whole layer, as on one device.
        h = self.drop6(self.exchange([F.relu(self.fc6[t](z)) for t in self.towers], "fc7_input"))
        h = self.drop7(self.exchange([F.relu(self.fc7[t](h)) for t in self.towers], "fc8_input"))
        return self.exchange([self.fc8[t](h) for t in self.towers], "logits")

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def paper_layers(model: nn.Module) -> dict[str, list[nn.Module]]:
    """conv1..conv5 and fc6..fc8, each as the modules that hold it (the paper model: one per
    tower; torchvision's variant: its single-tower layers in order)."""
    if isinstance(model, PaperAlexNet):
        return {name: list(layers) for name, layers in model.named_children() if isinstance(layers, nn.ModuleList)}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    names = [f"conv{i}" for i in range(1, 6)] + ["fc6", "fc7", "fc8"]
    return {name: [layer] for name, layer in zip(names, convs + fcs, strict=True)}


def init_paper_weights(model: nn.Module) -> None:
    """Section 5: weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5 and the fully-connected
    hidden layers (fc6, fc7), which "accelerates the early stages of learning by providing the
    ReLUs with positive inputs"; biases 0 in the remaining layers (conv1, conv3, fc8)."""
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name, layers in paper_layers(model).items():
        for layer in layers:
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.constant_(layer.bias, 1.0 if name in ones else 0.0)


def init_kaiming_weights(model: nn.Module) -> None:
    """He et al. 2015 (fan-in, ReLU gain) with zero biases. The paper's N(0, 0.01) start leaves the
    logits almost independent of the input (their spread over samples is ~0.1% of their size) and
    needs thousands of steps to break out; a few-minute run does not have them."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


def init_weights(model: nn.Module, init: Init) -> None:
    """Section 5's init ("paper") or He's ("kaiming"); "auto" leaves the model's own."""
    if init == "paper":
        init_paper_weights(model)
    elif init == "kaiming":
        init_kaiming_weights(model)
    elif init != "auto":  # "xavier" left PyTorch's default init, silently
        raise ValueError(f"init must be paper, kaiming or auto; got {init!r}")


def head_pieces(model: nn.Module) -> dict[str, list[str]]:
    """The fully-connected layers as ordered lists of modules whose output rows, stacked, make the
    whole layer: the paper's towers each hold half of a layer's neurons (fc8: half the logits)."""
    if isinstance(model, PaperAlexNet):
        return {name: [f"{name}.{t}" for t in TOWERS] for name in ("fc6", "fc7", "fc8")}
    return {"fc6": ["classifier.1"], "fc7": ["classifier.4"], "fc8": ["classifier.6"]}


def head_dropout(model: nn.Module) -> dict[str, CounterDropout]:
    """The dropout layers keyed by the fully-connected layer whose input they drop: fc7 and fc8
    in the paper model (fc6's and fc7's outputs), fc6 and fc7 in torchvision's."""
    if isinstance(model, PaperAlexNet):
        return {"fc7": model.drop6, "fc8": model.drop7}
    return {"fc6": model.classifier[0], "fc7": model.classifier[3]}


class ModelSizeError(ValueError):
    """The configured sizes (model.fc_width, model.num_classes) make a model this machine cannot allocate."""


def build_model(
    variant: Variant,
    num_classes: int,
    dropout: float = 0.5,
    input_size: int = PAPER_INPUT,
    init: Init = "auto",
    fc_width: int = FC_WIDTH,
) -> nn.Module:
    """`input_size` sets the paper model's fc6 fan-in; torchvision's variant pools any input to
    6x6 (torchvision's own choice, kept for weight compatibility). `init`: "auto" is each
    variant's own (section 5's for the paper model, torchvision's for its variant); "paper" and
    "kaiming" apply to either. `fc_width`: the neurons of fc6 and fc7 (4096 in both variants).
    A model too large to allocate is a ModelSizeError naming the two sizes, not torch's traceback."""
    try:
        return _build_variant(variant, num_classes, dropout, input_size, init, fc_width)
    except RuntimeError as exc:  # the CPU allocator's "can't allocate memory" (the model is built on the CPU)
        tried = re.search(r"(?i)tried to allocate ([\d.]+ \w+)", str(exc))
        if tried is None:
            raise
        raise ModelSizeError(
            f"the {variant} model with model.fc_width={fc_width} and {num_classes} classes cannot be allocated "
            f"(one of its layers needs {_readable_size(tried.group(1))}): lower model.fc_width or model.num_classes"
        ) from exc


def _readable_size(amount: str) -> str:
    """torch's "512000000000 bytes" as "512.0 GB"; a size already in units as it is."""
    number, _, unit = amount.partition(" ")
    if unit.lower() != "bytes":
        return amount
    return f"{float(number) / 1e9:.1f} GB"


def _build_variant(
    variant: Variant, num_classes: int, dropout: float, input_size: int, init: Init, fc_width: int
) -> nn.Module:
    if variant == "paper":
        return PaperAlexNet(num_classes, dropout, input_size, init, fc_width)
    if variant == "torchvision":
        # Imported here: importing torchvision takes about a second in every process (it loads
        # torch._dynamo), which the paper variant, trained from DALI, never needs.
        from alexnet.torchvision_variant import TorchvisionAlexNet

        model = TorchvisionAlexNet(num_classes, dropout, fc_width)
        init_weights(model, init)  # auto: torchvision's own, from its constructor
        return model
    raise ValueError(f"model.variant: unknown variant {variant!r} (choose 'paper' or 'torchvision')")


def min_input_size(variant: Variant) -> int:
    """Smallest square input for which pool5 is at least 1x1."""
    return 67 if variant == "paper" else 63
