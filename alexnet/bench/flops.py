"""Counted FLOPs of one training step and the peak FLOPS of common GPUs, for MFU.

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode records every matrix
product and convolution of one forward and backward pass of the single-device model (on the meta
device: shapes only, no arithmetic). Element-wise work (ReLU, LRN, pooling, the optimizer) is not
counted, as in every MFU convention; a split layout computes the same function, so the same count
applies to it. PyTorch's formula for a convolution's weight gradient ignores `groups` (it counts
a grouped convolution's weight gradient `groups` times over); the paper model runs its towers as
grouped convolutions, so the count here divides that term by `groups`.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

# Dense (no structured sparsity) peak TFLOPS per GPU from NVIDIA's datasheets, by precision.
# More specific names come first: the first entry whose key is in the device name as a word of
# its own wins (a plain substring took the L4's figures for an L40, the B200's for a GB200).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H800 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H800", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("GB200", {"bf16": 2500.0, "fp16": 2500.0, "tf32": 1250.0, "fp32": 80.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
)


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    bias,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    output_mask,
    out_shape,
    **kwargs,
) -> int:
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    flops = 0
    if output_mask[0]:
        flops += flop_counter.conv_backward_flop(*args, [True, False], out_val=out_shape)
    if output_mask[1]:
        flops += flop_counter.conv_backward_flop(*args, [False, True], out_val=out_shape) // max(int(groups), 1)
    return flops


def count_train_flops(model: nn.Module, batch: int, crop: int, channels: int = 3) -> int:
    """FLOPs (2 per multiply-add) of forward + backward of one batch through a copy of `model`."""
    meta = copy.deepcopy(model).to("meta")
    meta.train()
    images = torch.empty(batch, channels, crop, crop, device="meta")
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})
    with counter:
        out = meta(images)
        out.float().sum().backward()
    return int(counter.get_total_flops())


def precision_of(amp_name: str) -> str:
    """The tensor-core precision a run's matrix work uses: autocast's dtype, else TF32 where
    PyTorch lets cuDNN use it for convolutions (its default; AlexNet is mostly convolutions)."""
    if amp_name in ("bf16", "fp16"):
        return amp_name
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOPS of one device at `precision`, or None for devices not in the table (CPUs)."""
    for key, peaks in PEAK_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            tflops = peaks.get(precision) or peaks.get("fp32")
            return tflops * 1e12 if tflops else None
    return None


def mfu(flops_per_step: float, step_seconds: float, devices: int, peak_per_device: float | None) -> float | None:
    """Model FLOPs utilization: counted FLOPs per second over the peak of all devices."""
    if peak_per_device is None or step_seconds <= 0 or devices < 1:
        return None
    return flops_per_step / step_seconds / (devices * peak_per_device)
