"""Which torch device a command runs on (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``), and the
precision its training steps run in (``fp32``, ``bf16``, ``fp16``)."""

from __future__ import annotations

import contextlib

import torch

from charlm.config import PRECISIONS, check_choice
from charlm.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an unknown or unavailable device is a ``ConfigError``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} is not available: this torch sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} is not available: {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not _mps_available():
        raise ConfigError("device 'mps' is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {name!r}; use {DEVICE_CHOICES}")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """``--precision`` on ``device``: fp32 anywhere; bf16 on CPUs and on CUDA GPUs that support it;
    fp16 on CUDA GPUs only (oneDNN has no fp16 LSTM kernel for CPUs)."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp32":
        return
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                              f"use fp16 or fp32")
        return
    if device.type == "cpu" and precision == "bf16":
        return
    where = "CPUs" if device.type == "cpu" else f"{device.type} devices"
    ok = "bf16 or fp32" if device.type == "cpu" else "fp32"
    raise ConfigError(f"--precision {precision} is not supported on {where}; use {ok} (fp16 needs a CUDA GPU)")


def autocast(precision: str, device: torch.device):
    """The context a training step's forward pass and loss run in: nothing for fp32, else autocast
    to bf16 or fp16 (matrix products in the low precision; the loss and the weights stay fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(precision: str, device: torch.device):
    """A loss scaler for fp16 (small gradients would underflow); a disabled one, which passes
    everything through unchanged, otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
