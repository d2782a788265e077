"""``charlm export --quantize int8``: the exported graph's weights in 8-bit integers.

onnxruntime's own dynamic quantization (``onnxruntime.quantization.quantize_dynamic``), not a
quantizer of charlm's: each weight matrix a step multiplies by (``W_hh`` of layer 0, ``[W_ih ; W_hh]``
above it, the output layer) is stored as signed int8 with one scale per
output column (``per_channel``); the activations are quantized on the fly, step by step. Those
products read a quarter of the bytes they did, which is what a single stream's speed depends on
wherever the weights do not fit in the CPU's cache; the model file is about a third of the fp32 one
(layer 0's input table, the state, the biases and the nonlinearities stay fp32; a small model's
file is nearer a half).

The weights use 7 bits of the int8 range (``reduce_range``: -64..64, not -127..127). onnxruntime
multiplies the activations (uint8, 0..255) by the weights (int8) and, on x86 CPUs without VNNI (AVX2-only
ones without AVX-VNNI, such as the AMD EPYC the figures below come from, and AVX-512 ones before VNNI),
adds each pair of products in a saturating 16-bit instruction: with full-range weights, 255 x 127 x 2
overflows 32,767 and the sum is silently clipped.
On such a CPU a full-range export's log-probabilities were off by up to 1.2 nats (and the greedy
choice changed at 98% of the positions) for a model whose weights fill their columns' ranges, and
by 0.45 nats for the quickstart model; with 7 bits no pair can reach the limit (255 x 64 x 2 =
32,640), so no CPU's integer sums saturate and the figures agree from CPU to CPU up to fp32 rounding,
at the cost of one bit of precision.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHT_LIMIT = 64  # abs(int8 weight) <= this: no pair of u8 x s8 products saturates int16 (see above)
QUANTIZATIONS = ("int8",)  # what --quantize takes (and None: fp32 weights)


def quantize_int8(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Write ``dest``: the fp32 model ``src`` with int8 weights (7-bit range, per output channel) and
    dynamic activations."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer advises "pre-processing" through the root logger (which would also configure logging for
    # the whole process): its shape inference changes nothing in this graph, so the advice is kept quiet.
    root, quiet = logging.getLogger(), logging.NullHandler()
    level = root.level
    root.addHandler(quiet)
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(Path(src), Path(dest), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=True, extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
        root.removeHandler(quiet)
    widest = int8_weight_range(dest)
    if widest > WEIGHT_LIMIT:  # an onnxruntime whose reduce_range means something else: refuse, do not mislead
        from charlm.export.graph import ExportError

        Path(dest).unlink()
        raise ExportError(f"this onnxruntime's quantizer wrote int8 weights up to {widest}, and only weights up to "
                          f"{WEIGHT_LIMIT} give the same figures on every CPU: export without --quantize")


def int8_weight_range(path: str | os.PathLike) -> int:
    """The largest absolute value among the int8 initializers of ``path`` (its weights; 0 where there is none).

    Every int8 tensor is looked at (a ``MatMulInteger``'s weights, or any other quantized node's), and a
    ``MatMulInteger`` whose weights are not an initializer is an error: nothing int8 goes unchecked. Every
    error (that one, a file that cannot be read or is not ONNX) is an
    :class:`~charlm.export.graph.ExportError`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    from charlm.errors import os_error_line
    from charlm.export.graph import ExportError

    try:
        graph = onnx.load(str(path)).graph
    except OSError as exc:
        raise ExportError(f"{path}: cannot read it ({os_error_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, and whatever else a file that is not ONNX gives
        raise ExportError(f"{path} is not an ONNX model ({type(exc).__name__})") from None
    names = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "MatMulInteger" and node.input[1] not in names:
            raise ExportError(f"{path}: MatMulInteger {node.name!r} multiplies by {node.input[1]!r}, "
                              "not a stored weight")
    return max((int(np.abs(numpy_helper.to_array(t).astype(np.int16)).max()) for t in graph.initializer
                if t.data_type == TensorProto.INT8 and t.dims and np.prod(t.dims) > 0), default=0)
