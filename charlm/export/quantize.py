"""``charlm export --quantize int8``: the exported graph's weights in 8-bit integers.

onnxruntime's own dynamic quantization (``onnxruntime.quantization.quantize_dynamic``), not a
quantizer of charlm's: each weight matrix a step multiplies by (``W_hh`` of layer 0, ``[W_ih ; W_hh]``
above it, the output layer) is stored as signed int8 with one scale per
output column (``per_channel``); the activations are quantized on the fly, step by step. Those
products read a quarter of the bytes they did, which is what a single stream's speed depends on
wherever the weights do not fit in the CPU's cache; the model file is about a third of the fp32 one
(layer 0's input table, the state, the biases and the nonlinearities stay fp32; a small model's
file is nearer a half).
"""

from __future__ import annotations

import os
from pathlib import Path

QUANTIZATIONS = ("int8",)  # what --quantize takes (and None: fp32 weights)


def quantize_int8(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Write ``dest``: the fp32 model ``src`` with int8 weights (per output channel), activations dynamic."""
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
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
        root.removeHandler(quiet)
