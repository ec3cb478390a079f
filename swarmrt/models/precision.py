"""Where a stage computes and in what precision.

:func:`place` moves a stage module to its device and wraps its ``forward`` (on the instance, so
the state dict keeps its keys and peers on different devices exchange state unchanged): the input
arrives from the wire on the CPU and moves to the device; the layers run under ``torch.autocast``
in ``model.precision`` (bf16 or fp16) while the parameters, their gradients and the optimizer state
stay fp32 (the master weights); a floating output is cast to the compute dtype and moved back to
the CPU, so activations and their gradients cross the wire in the compute dtype. Every move and
cast is part of the autograd graph, so the backward returns CPU gradients of the wire dtype.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``model.precision`` -> the compute dtype."""


def default_device() -> str:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def wire_dtype(precision: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of ``dtype`` crosses the wire in: floating ones in the compute dtype."""
    return DTYPES[precision] if dtype.is_floating_point else dtype


def place(module: nn.Module, device: str | torch.device, precision: str) -> nn.Module:
    """``module`` on ``device``, computing in ``precision`` (see the module docstring); returns it."""
    device = torch.device(device)
    compute = DTYPES[precision]
    module.to(device)
    if device.type == "cpu" and compute == torch.float32:
        return module  # nothing to move or cast
    inner = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
            out = inner(x.to(device))
        if out.is_floating_point():
            out = out.to(compute)
        return out.to("cpu")

    module.forward = forward
    return module
