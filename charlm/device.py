"""Which torch device a command runs on (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``), the
precision its training steps run in (``fp32``, ``bf16``, ``fp16``), and what this machine can do.

Users' CPUs differ: bf16 runs natively only with AVX-512 BF16 or AMX; elsewhere oneDNN refuses the
LSTM in bf16 outright and the other cells run emulated, an order of magnitude slower than fp32. So
a low precision is checked by trying it: :func:`probe_precision` runs one small forward and backward
pass of the run's own cell under autocast (and, on a CPU, times it against fp32) before any work
starts. The same probe tells the tests what to expect of the machine they run on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import re
import time
from dataclasses import dataclass, replace

import torch

from charlm.config import DEVICE_CHOICES, GATES, PRECISIONS, ModelConfig, check_choice, mogrify_rank_limit
from charlm.errors import ConfigError
from charlm.models import RNNLM

# A bf16 step of a 256-unit cell takes 0.6-1.1x an fp32 step with native bf16 and 10-15x emulated (this
# project's CPU, as itself and as an AVX2 machine); a tiny model's steps are mostly overhead, whatever the CPU.
EMULATED_RATIO = 3.0  # a low-precision probe step slower than this many fp32 ones: no native instructions
_PROBE_HIDDEN, _PROBE_BATCH, _PROBE_STEPS, _PROBE_VOCAB = 256, 16, 16, 64  # one layer of the run's cell
_PROBE_EMBEDDING = 64  # embedded inputs of any size take the same kernels (one-hot ones the same as each other)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def _cuda_bf16() -> bool:
    """Whether the current CUDA GPU has native bf16 (Ampere and newer). torch's check counts emulated bf16
    (V100, T4) unless told not to: there a bf16 step runs, far slower than fp32."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


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


@dataclass(frozen=True)
class PrecisionProbe:
    """What one forward and backward pass of a model under a precision's autocast showed."""

    precision: str
    device: str
    cell: str
    error: str | None = None  # the first line of the error, where it did not run
    ratio: float | None = None  # its step time over fp32's (timed on CPUs only)

    @property
    def runs(self) -> bool:
        return self.error is None

    @property
    def emulated(self) -> bool:
        """It runs, but far slower than fp32: the CPU lacks the instructions and they are emulated."""
        return self.ratio is not None and self.ratio > EMULATED_RATIO


def cpu_capability() -> str:
    """The vector instructions torch's CPU kernels use here (``AVX2``, ``AVX512``, ...; ATEN_CPU_CAPABILITY
    lowers it)."""
    return torch.backends.cpu.get_cpu_capability()


def _probe_step(model, X, precision: str, device: torch.device) -> None:
    with autocast(precision, device):
        logits, _ = model(X)
        loss = logits.float().logsumexp(-1).mean()
    loss.backward()


def _time_ratio(model, X, precision: str, device: torch.device, repeats: int = 3) -> float:
    """The fastest of ``repeats`` steps in ``precision`` over the fastest in fp32, after one untimed step of
    each (first-call set-up); the two alternate, so that a busy machine slows both alike."""
    best = {"fp32": float("inf"), precision: float("inf")}
    for name in best:
        _probe_step(model, X, name, device)
    for _ in range(repeats):
        for name in best:
            t0 = time.perf_counter()
            _probe_step(model, X, name, device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best[precision] / best["fp32"]


def probe_precision(precision: str, device: str, model: ModelConfig) -> PrecisionProbe:
    """Try ``precision`` on ``device`` (a string, e.g. ``"cpu"``) with one layer of ``model``'s cell, inputs
    and implementation, 256 units wide (the kernels are chosen by cell and type, not size; a width at which
    the arithmetic, not the overhead, decides the time). On a CPU, also time it against fp32.

    It leaves the global RNG as it found it (the model and its batch are drawn on a forked RNG), so
    probing does not change a run's results. Cached: each kind of model is probed once a process."""
    config = ModelConfig(vocab_size=_PROBE_VOCAB, cell=model.cell, hidden_size=_PROBE_HIDDEN, impl=model.impl,
                         embedding_dim=_PROBE_EMBEDDING if model.embedding_dim else 0,
                         mogrify_rounds=model.mogrify_rounds)
    if model.mogrify_rank:  # (at most the rank that still saves parameters at the probe's size)
        config = dataclasses.replace(config, mogrify_rank=min(model.mogrify_rank, mogrify_rank_limit(config)))
    return _probe(precision, device, config)


@functools.lru_cache(maxsize=None)
def _probe(precision: str, device: str, config: ModelConfig) -> PrecisionProbe:
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(0)
        net = RNNLM.from_config(config).to(dev)
        X = torch.randint(0, _PROBE_VOCAB, (_PROBE_BATCH, _PROBE_STEPS), device=dev)
        try:
            if dev.type != "cpu" or precision == "fp32":
                _probe_step(net, X, precision, dev)
                return PrecisionProbe(precision, device, config.cell)
            return PrecisionProbe(precision, device, config.cell, ratio=_time_ratio(net, X, precision, dev))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return PrecisionProbe(precision, device, config.cell, error=first)


def check_precision(precision: str, device: torch.device, model: ModelConfig | None = None) -> str | None:
    """``--precision`` on ``device``: fp32 anywhere; bf16 on CPUs and on CUDA GPUs that support it;
    fp16 on CUDA GPUs only (oneDNN has no fp16 LSTM kernel for CPUs). Given the run's ``model``, a low
    precision is also tried (:func:`probe_precision`): one that does not run here is a ``ConfigError``
    naming the cell; one that runs only emulated returns a one-line warning (else ``None``)."""
    check_choice("precision", precision, PRECISIONS)
    if precision in ("fp32", "auto"):  # auto is resolved first (resolve_precision), to a precision that runs
        return None
    if device.type == "cuda":
        if precision == "bf16" and not _cuda_bf16():
            raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                              f"use fp16 or fp32")
    elif device.type != "cpu" or precision != "bf16":
        where = "CPUs" if device.type == "cpu" else f"{device.type} devices"
        ok = "bf16 or fp32" if device.type == "cpu" else "fp32"
        raise ConfigError(f"--precision {precision} is not supported on {where}; use {ok} (fp16 needs a CUDA GPU)")
    if model is None:
        return None
    probe = probe_precision(precision, str(device), model)
    cell = model.cell.upper()
    if device.type == "cpu":
        if not probe.runs:
            raise ConfigError(f"--precision {precision}: this CPU ({cpu_capability()}) has no {precision} kernel for "
                              f"the {cell} (native bf16 needs AVX-512 BF16 or AMX); use --precision fp32")
        if probe.emulated:
            return (f"--precision {precision}: this CPU ({cpu_capability()}) has no native {precision}: a {precision} "
                    f"step of a {cell} {_PROBE_HIDDEN} took {probe.ratio:.1f}x an fp32 step (emulated); "
                    f"--precision fp32 is faster")
        return None
    if not probe.runs:
        raise ConfigError(f"--precision {precision} does not run the {cell} on {device} ({probe.error}); use fp32")
    return None


def resolve_precision(precision: str, device: torch.device, model: ModelConfig) -> str:
    """``auto`` -> ``bf16`` where this device runs the model's cell in bf16 natively (a CUDA GPU with bf16;
    a CPU whose probe step ran at least as fast as EMULATED_RATIO allows), else ``fp32``; any other
    precision as it is."""
    check_choice("precision", precision, PRECISIONS)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if _cuda_bf16() else "fp32"
    if device.type != "cpu":
        return "fp32"
    probe = probe_precision("bf16", str(device), model)
    return "bf16" if probe.runs and not probe.emulated else "fp32"


def onednn_version() -> str | None:
    """The oneDNN (MKL-DNN) version torch was built with, from its build configuration."""
    found = re.search(r"MKL-DNN v([0-9.]+)", torch.__config__.show())
    return found.group(1) if found else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_kernels() -> str:
    """Which code runs each cell's recurrence on a CPU (torch's RNN dispatch: the LSTM goes to oneDNN's fused
    primitive when oneDNN is enabled, the GRU and tanh RNN to ATen's cells over matrix products)."""
    onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    lstm = "oneDNN fused LSTM" if onednn else "ATen LSTM cell, a matmul per step"
    return f"LSTM: {lstm}; GRU, RNN: ATen cells, a matmul per step; --impl scratch: charlm's cells, a matmul per step"


def _bf16_line(probes: dict[str, PrecisionProbe]) -> str:
    parts = []
    for cell, probe in probes.items():
        if not probe.runs:
            parts.append(f"{cell.upper()} refused ({probe.error.split('. ')[0]})")
        else:
            verdict = "emulated" if probe.emulated else "native"
            parts.append(f"{cell.upper()} {verdict} ({probe.ratio:.1f}x fp32's time)")
    return "; ".join(parts)


def describe_machine() -> list[tuple[str, str]]:
    """What this machine offers charlm, as (label, value) rows for ``charlm env``: torch and oneDNN, the CPU
    and the instructions torch's kernels use, threads, bf16 per cell (probed), CUDA and MPS devices."""
    rows = [("python", platform.python_version()),
            ("torch", f"{torch.__version__} (oneDNN {onednn_version() or 'absent'})"),
            ("cpu", f"{_cpu_name()}, {os.cpu_count()} logical cores"),
            ("cpu kernels", f"{cpu_capability()} (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA can lower it)"),
            ("threads", f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op "
                        f"(OMP_NUM_THREADS sets them)"),
            ("recurrence", _cpu_kernels())]
    base = ModelConfig(vocab_size=2, embedding_dim=64)
    probes = {cell: probe_precision("bf16", "cpu", replace(base, cell=cell)) for cell in ("rnn", "gru", "lstm")}
    rows.append(("bf16 on cpu", _bf16_line(probes)))
    rows.append(("fp16 on cpu", "no (oneDNN has no fp16 LSTM for training; charlm offers fp16 on CUDA only)"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            bf16 = "bf16 and fp16" if _cuda_bf16() else "fp16 only"
            cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "absent"
            rows.append((f"cuda:{i}", f"{torch.cuda.get_device_name(i)}, {bf16}, cuDNN {cudnn}"))
    else:
        rows.append(("cuda", f"no CUDA GPU visible (torch built for CUDA {torch.version.cuda})" if torch.version.cuda
                     else "no (this torch is built for CPUs only)"))
    rows.append(("mps", "available" if _mps_available() else "no"))
    return rows


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


# A training step holds, per parameter, the weights, their gradients, the optimizer's state (Adam's two
# moments; nothing for plain SGD) and the trainer's copy of the best weights; per character of a batch, each
# layer's gates and states kept for the backward pass (a mogrifier's also each round's gate, input and gradient)
# and the logits with their softmax and gradient.
_OPTIMIZER_COPIES = {"adam": 2, "sgd": 0}


def training_footprint(config: ModelConfig, batch_size: int, num_steps: int, optimizer: str) -> tuple[int, int]:
    """(parameters, bytes) that training ``config`` needs, estimated without allocating anything (the model
    is built on the meta device); a ``ConfigError`` (one line) when no such model can even be described."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            params = RNNLM.from_config(config).num_parameters()
    except (RuntimeError, OverflowError, ValueError) as exc:
        inputs = f"{config.embedding_dim:,}-dim embedded" if config.embedding_dim else "one-hot"
        raise ConfigError(f"a {config.num_layers} x {config.cell.upper()} {config.hidden_size:,} model with {inputs} "
                          f"inputs is too large to build ({str(exc).splitlines()[0][:100]}); use a smaller "
                          f"--hidden-size or --embedding-dim") from None
    kept = GATES[config.cell] + 3 + (3 * config.mogrify_rounds + 4 if config.cell == "mogrifier" else 0)
    per_char = config.num_layers * kept * config.hidden_size + config.input_size + 3 * config.vocab_size
    return params, 4 * (params * (3 + _OPTIMIZER_COPIES.get(optimizer, 2)) + batch_size * num_steps * per_char)


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still give: the GPU's free memory, or the system's available memory (Linux's
    MemAvailable, else the free pages); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_memory(config: ModelConfig, batch_size: int, num_steps: int, optimizer: str,
                 device: torch.device) -> int:
    """Refuse (one line) a model whose training cannot fit in the device's available memory, before anything
    is allocated or written; the number of parameters otherwise."""
    params, need = training_footprint(config, batch_size, num_steps, optimizer)
    free = available_memory(device)
    if free is not None and need > free:
        mog = config.cell == "mogrifier"
        raise ConfigError(f"training a {params:,}-parameter model (--hidden-size {config.hidden_size}, --num-layers "
                          f"{config.num_layers}, --embedding-dim {config.embedding_dim}"
                          + (f", --mogrify-rounds {config.mogrify_rounds}, --mogrify-rank {config.mogrify_rank}"
                             if mog else "") + f") with batches of "
                          f"{batch_size} x {num_steps} needs about {need / 2**30:,.1f} GiB, but {device} has "
                          f"{free / 2**30:,.1f} GiB available; use a smaller --hidden-size, --embedding-dim"
                          + (", --mogrify-rounds" if mog else "") + " or "
                          f"--batch-size")
    return params
