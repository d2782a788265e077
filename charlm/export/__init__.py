"""``charlm export``: a trained model outside PyTorch, and what runs it.

- :mod:`charlm.export.graph`: the one-step ONNX graph (:class:`~charlm.export.graph.OneStep`,
  :class:`~charlm.export.graph.MogrifierStep`, :func:`~charlm.export.graph.export_onnx`) and its metadata (:func:`~charlm.export.graph.read_metadata`),
  fp32 or quantized to int8 (:mod:`charlm.export.quantize`);
- :mod:`charlm.export.engine`: generation and evaluation of an exported model on onnxruntime
  (:class:`~charlm.export.engine.OnnxModel`, :func:`~charlm.export.engine.evaluate_onnx`);
- :mod:`charlm.export.web`: the static web page that generates in the browser on onnxruntime-web
  (:func:`~charlm.export.web.export_web`); its files are in ``charlm/export/page/``.

Each public name is also importable from ``charlm.export`` itself.

Needs the ``onnx`` extra (onnx, onnxruntime, onnxscript).
"""

from charlm.export.engine import BoundStep, OnnxModel, evaluate_onnx, step_threads
from charlm.export.graph import (FORMATS, META_KEY, OPSET, ExportError, MogrifierStep, OneStep, export_onnx, metadata,
                                 read_metadata, tokenizer_path)
from charlm.export.web import ORT_WEB_VERSION, export_web, ort_web_files

__all__ = ["BoundStep", "ExportError", "FORMATS", "META_KEY", "MogrifierStep", "OPSET", "ORT_WEB_VERSION", "OneStep",
           "OnnxModel", "evaluate_onnx", "export_onnx", "export_web", "metadata", "ort_web_files", "read_metadata",
           "step_threads", "tokenizer_path"]
