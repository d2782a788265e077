"""``charlm export --format onnx``: a trained model as a one-step ONNX graph.

The graph is what a generation loop needs: ``ids`` (N,) int64 and the carried state ``h`` (L, N, H)
(and ``c`` for the LSTM and the mogrifier) in; ``logits`` (N, V) and the new state ``h_out`` (and ``c_out``)
out; N is dynamic. It is :class:`OneStep`: the cells' equations (those of ``nn.RNN``/``GRU``/``LSTM``, which
charlm's scratch cells share) on the model's own weights, with layer 0's input gates looked up in a
table (one row per character: a one-hot input picks a column of ``W_ih``, an embedding row is a
constant), so every cell, input kind and implementation exports the same way; a Mogrifier LSTM's is
:class:`MogrifierStep`, laid out as charlm's :class:`~charlm.models.stepper.MogrifierStepper`. The logits are
the model's own (``<unk>`` included: a generation loop leaves it out, as charlm's does).

The vocabulary travels beside the model, named after it (``NAME.tokenizer.json`` beside
``NAME.onnx``: several models share a folder); the model's metadata holds its sha256, the cell and
sizes, the preprocessing, the prediction from the zero state (for an empty prompt) and charlm's
version. :func:`read_metadata` refuses an ONNX file that is not charlm's. An export replaces only a
model charlm exported and its own vocabulary (:mod:`charlm.outputs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from charlm.config import MOGRIFIER_FIELDS, PAIR_STATE_CELLS
from charlm.errors import CharlmError
from charlm.models.stepper import MogrifierStepper, lstm_gate_order
from charlm.outputs import (check_file, check_not_inside_owned, check_parent, move_into_empty, new_folders,
                            resolve_path, temp_prefix)

FORMATS = ("onnx", "web")
OPSET = 18
META_KEY = "charlm"  # the metadata entry (JSON) that marks a charlm model


class ExportError(CharlmError):
    """An export that cannot be made, or an ONNX file charlm cannot run."""


class OneStep(nn.Module):
    """One character for N sequences on an ``RNNLM``'s weights (copied: the model is not changed).

    Laid out for few, large products (a single sequence's step reads every weight once, so its speed
    is that of memory, and each graph node costs a few microseconds more): layer 0's input gates come
    from the table, with both biases folded in; above it, an RNN or LSTM layer is one product of
    ``[h_below | h_k]`` by ``[W_ih ; W_hh]`` (a GRU keeps two: its reset gate scales only the hidden
    part); the LSTM's gate rows are reordered to (i, f, o, g) so one sigmoid covers three gates; the
    state stays (1, N, H) per layer, so nothing is squeezed or stacked between layers.
    """

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        if cfg.cell == "mogrifier":
            raise ExportError("a Mogrifier LSTM's one-step graph is MogrifierStep")
        self.cell, self.L, self.H = cfg.cell, cfg.num_layers, cfg.hidden_size
        H, rnn = self.H, model.rnn
        order = lstm_gate_order(H) if self.cell == "lstm" else None

        def w(name, k):
            p = getattr(rnn, f"{name}_l{k}").detach().float()
            return (p if order is None else p[order]).clone()

        fold = self.cell != "gru"  # the hidden bias simply adds to the input gates' (not so in a GRU's candidate)
        with torch.no_grad():
            inputs = (model.embedding.weight.detach().float() if model.embedding is not None
                      else torch.eye(cfg.vocab_size))
            table = inputs @ w("weight_ih", 0).t() + w("bias_ih", 0) + (w("bias_hh", 0) if fold else 0)
        self.register_buffer("table", table)  # (V, G*H): layer 0's input gates per character
        for k in range(self.L):
            if fold:  # layer 0: W_hh alone (its bias is in the table); above: [W_ih ; W_hh], one bias
                weight = torch.cat([w("weight_ih", k), w("weight_hh", k)], 1) if k else w("weight_hh", k)
                self.register_buffer(f"w{k}", weight.t().contiguous())
                if k:
                    self.register_buffer(f"b{k}", w("bias_ih", k) + w("bias_hh", k))
            else:  # GRU: the hidden product and its bias apart, and above layer 0 the input product too
                self.register_buffer(f"w{k}", w("weight_hh", k).t().contiguous())
                self.register_buffer(f"b{k}", w("bias_hh", k))
                if k:
                    self.register_buffer(f"w_ih{k}", w("weight_ih", k).t().contiguous())
                    self.register_buffer(f"b_ih{k}", w("bias_ih", k))
        self.register_buffer("w_head", model.head.weight.detach().float().t().contiguous())
        self.register_buffer("b_head", model.head.bias.detach().float().clone())

    def forward(self, ids: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None = None):
        H, x, below = self.H, self.table[ids].unsqueeze(0), None  # x: layer 0's input gates (1, N, G*H)
        hs, cs = h.split(1), (c.split(1) if c is not None else None)
        new_h, new_c = [], []
        for k in range(self.L):
            if self.cell == "gru":
                gi = x if k == 0 else below @ getattr(self, f"w_ih{k}") + getattr(self, f"b_ih{k}")
                gh = hs[k] @ getattr(self, f"w{k}") + getattr(self, f"b{k}")
                r, z = torch.sigmoid(gi[..., :2 * H] + gh[..., :2 * H]).split(H, 2)
                n = torch.tanh(gi[..., 2 * H:] + r * gh[..., 2 * H:])
                below = n + z * (hs[k] - n)
            else:
                if k == 0:
                    g = x + hs[0] @ self.w0
                else:
                    g = torch.cat([below, hs[k]], 2) @ getattr(self, f"w{k}") + getattr(self, f"b{k}")
                if self.cell == "rnn":
                    below = torch.tanh(g)
                else:
                    i, f, o = torch.sigmoid(g[..., :3 * H]).split(H, 2)
                    new_c.append(f * cs[k] + i * torch.tanh(g[..., 3 * H:]))
                    below = o * torch.tanh(new_c[-1])
            new_h.append(below)
        logits = (below @ self.w_head + self.b_head).squeeze(0)
        if self.cell == "lstm":
            return logits, torch.cat(new_h), torch.cat(new_c)
        return logits, torch.cat(new_h)


class MogrifierStep(nn.Module):
    """One character for N sequences on a Mogrifier LSTM's weights (copied), as
    :class:`~charlm.models.stepper.MogrifierStepper` computes it: layer 0's inputs from a table (embedding
    rows, or the identity's for one-hot inputs); per layer, the rounds (a product by each round's ``Q`` or
    ``R``, full matrices), then one product of ``[x | h]`` by ``[W_ih | W_hh]`` with the gate rows in (i, f,
    o, g) order; then the head. The state is (1, N, H) per layer, as :class:`OneStep`'s."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.L, self.H = cfg.num_layers, cfg.hidden_size
        table, layers, (w_head, b_head) = MogrifierStepper._prepare(model, None)
        self.register_buffer("table", table.detach().float().clone())  # (V, I): layer 0's input per character
        self.rounds = []  # per layer, the names of its rounds' matrices, in order
        for k, (qt, rt, w, b) in enumerate(layers):
            names = []
            for i in range(len(qt) + len(rt)):
                name, m = (f"q{k}_{i}", qt[i // 2]) if i % 2 == 0 else (f"r{k}_{i}", rt[i // 2])
                self.register_buffer(name, m.float().clone())  # (H, I) gates x, or (I, H) gates h
                names.append(name)
            self.rounds.append(names)
            self.register_buffer(f"w{k}", w.float().clone())  # (I + H, 4H)
            self.register_buffer(f"b{k}", b.float().clone())
        self.register_buffer("w_head", w_head.float().clone())  # (H, V)
        self.register_buffer("b_head", b_head.float().clone())

    def forward(self, ids: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        H, x = self.H, self.table[ids].unsqueeze(0)  # x: layer 0's input (1, N, I)
        hs, cs = h.split(1), c.split(1)
        new_h, new_c = [], []
        for k in range(self.L):
            hk = hs[k]
            for i, name in enumerate(self.rounds[k]):
                if i % 2 == 0:  # x <- x * 2 sigmoid(Q h)
                    x = x * (2 * torch.sigmoid(hk @ getattr(self, name)))
                else:  # h <- h * 2 sigmoid(R x)
                    hk = hk * (2 * torch.sigmoid(x @ getattr(self, name)))
            g = torch.cat([x, hk], 2) @ getattr(self, f"w{k}") + getattr(self, f"b{k}")
            i, f, o = torch.sigmoid(g[..., :3 * H]).split(H, 2)
            new_c.append(f * cs[k] + i * torch.tanh(g[..., 3 * H:]))
            x = o * torch.tanh(new_c[-1])
            new_h.append(x)
        logits = (x @ self.w_head + self.b_head).squeeze(0)
        return logits, torch.cat(new_h), torch.cat(new_c)


def _io_names(cell: str) -> tuple[list[str], list[str]]:
    if cell in PAIR_STATE_CELLS:
        return ["ids", "h", "c"], ["logits", "h_out", "c_out"]
    return ["ids", "h"], ["logits", "h_out"]


def tokenizer_path(model_path: str | os.PathLike) -> Path:
    """Where an exported model's vocabulary lies: ``NAME.tokenizer.json`` beside ``NAME.onnx``."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.tokenizer.json")


def _charlm_meta(path: Path) -> dict | None:
    """The charlm metadata of the ONNX file ``path``, or None when it is not a model charlm exported."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        raw = next((p.value for p in model.metadata_props if p.key == META_KEY), None)
        return json.loads(raw) if raw is not None else None
    except Exception:  # noqa: BLE001 - not an ONNX file, or not one charlm can read: not charlm's
        return None


def _check_targets(out: Path, vocab_path: Path) -> None:
    """Refuse to replace a file that is not an earlier charlm export: the model (charlm's metadata in it), or
    the vocabulary named after it (a charlm vocabulary: its own, or one a kill left beside no model yet)."""
    check_file(out, out.is_file() and _charlm_meta(out) is not None, "an ONNX model")
    check_file(vocab_path, _is_vocabulary(vocab_path), f"the vocabulary of {out.name}")


def _is_vocabulary(path: Path) -> bool:
    from charlm.vocab import Vocab

    try:
        Vocab.load(path)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return path.is_file()


def export_onnx(ckpt, out: str | os.PathLike, dynamo: bool = True, quantize: str | None = None) -> Path:
    """Write ``out`` (the ONNX model) and its vocabulary beside it (:func:`tokenizer_path`); nothing is left
    half-written, and a file there that charlm did not export is refused, untouched. ``quantize="int8"``
    stores the weights in 8-bit integers (:mod:`charlm.export.quantize`); the metadata says so."""
    import onnx

    from charlm.export.quantize import QUANTIZATIONS, quantize_int8

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    out = resolve_path(out)  # (x/../mine.onnx is mine.onnx, checked as such)
    if out.suffix != ".onnx" or not out.stem:
        raise ExportError(f"--out {out}: an ONNX model's file name ends in .onnx (e.g. --out model.onnx)")
    vocab_path = tokenizer_path(out)
    check_parent(out)
    check_not_inside_owned(out, "onnx")
    _check_targets(out, vocab_path)
    _check_writable(out.parent)
    cfg = ckpt.model.config
    step = (MogrifierStep if cfg.cell == "mogrifier" else OneStep)(ckpt.model).eval()
    inputs, outputs = _io_names(cfg.cell)
    L, H = cfg.num_layers, cfg.hidden_size
    args = (torch.tensor([1, 2]), torch.zeros(L, 2, H)) + ((torch.zeros(L, 2, H),) if cfg.cell in PAIR_STATE_CELLS
                                                           else ())
    with new_folders(out.parent), tempfile.TemporaryDirectory(dir=out.parent, prefix=temp_prefix(out.name)) as tmp:
        tmp_model, tmp_vocab = Path(tmp) / "model.onnx", Path(tmp) / "vocab.json"
        ckpt.vocab.save(tmp_vocab)
        if quantize is None:
            _torch_export(step, args, inputs, outputs, tmp_model, dynamo)
        else:
            fp32 = Path(tmp) / "fp32.onnx"
            _torch_export(step, args, inputs, outputs, fp32, dynamo)
            quantize_int8(fp32, tmp_model)
        model = onnx.load(str(tmp_model))
        meta = metadata(ckpt, hashlib.sha256(tmp_vocab.read_bytes()).hexdigest(), quantize)
        del model.metadata_props[:]
        entry = model.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta)
        model.producer_name = "charlm"
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp_model))
        os.replace(tmp_model, out)  # the model first: a kill before the vocabulary's rename leaves a model that
        os.replace(tmp_vocab, vocab_path)  # refuses the old vocabulary (its sha256), and a retry replaces both
    return out


def _torch_export(step, args, inputs, outputs, path: Path, dynamo: bool) -> None:
    import logging
    import warnings

    # the exporter logs a warning per torchvision operator it cannot register (torchvision is not needed)
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        _export(step, args, inputs, outputs, path, dynamo)
    finally:
        quiet.setLevel(level)


def _export(step, args, inputs, outputs, path: Path, dynamo: bool) -> None:
    import warnings

    n = "N"
    if dynamo:
        shapes = {"ids": {0: torch.export.Dim(n)}, "h": {1: torch.export.Dim(n)}}
        if len(args) == 3:
            shapes["c"] = {1: torch.export.Dim(n)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(step, args, dynamo=True, input_names=inputs, output_names=outputs,
                                        dynamic_shapes=shapes, opset_version=OPSET, optimize=True, verbose=False)
        program.save(str(path))
        return
    axes = {"ids": {0: n}, "h": {1: n}, "c": {1: n}, "logits": {0: n}, "h_out": {1: n}, "c_out": {1: n}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(step, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes={k: v for k, v in axes.items() if k in inputs + outputs},
                          opset_version=OPSET)


def metadata(ckpt, vocab_sha256: str, quantization: str | None = None) -> dict:
    """The ``charlm`` metadata entry of an export of ``ckpt`` (its fields: the docs' file formats page)."""
    import math

    from charlm import __version__

    cfg = ckpt.model.config
    with torch.no_grad():
        zero = ckpt.model.head.bias.detach().float().tolist()  # the head's answer to the zero state
    best, chars = ckpt.held_out_figure()
    return {"format": 1, "charlm_version": __version__, "cell": cfg.cell, "impl": cfg.impl,
            "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "embedding_dim": cfg.embedding_dim,
            "vocab_size": cfg.vocab_size, "preprocess": ckpt.preprocess, "tokenizer_sha256": vocab_sha256,
            "zero_state_logits": zero, "inputs": _io_names(cfg.cell)[0], "outputs": _io_names(cfg.cell)[1],
            "quantization": quantization, "parameters": ckpt.model.num_parameters(),
            "corpus": ckpt.corpus_info or None,  # so that charlm eval MODEL.onnx finds the run's held-out text
            "held_out_bits_per_char": None if best is None else best / math.log(2), "held_out_chars": chars,
            "step": ckpt.progress.get("step"), "lineage": ckpt.meta.get("lineage"),
            **({name: getattr(cfg, name) for name in MOGRIFIER_FIELDS} if cfg.cell == "mogrifier" else {})}



def read_metadata(path: str | os.PathLike) -> dict:
    """The charlm metadata of an ONNX model file; an ``ExportError`` (one line) for anything else."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX model file")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; one line for any of them
        raise ExportError(f"{path} is not an ONNX model onnxruntime can load ({str(exc).splitlines()[0][:200]})") \
            from None
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if raw is None:
        raise ExportError(f"{path} is an ONNX model, but not one charlm exported (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: its '{META_KEY}' metadata is not charlm's (not a JSON object)")
    if meta.get("format") != 1:
        raise ExportError(f"{path} was exported in format {meta.get('format')!r}; this charlm reads format 1 "
                          f"(a newer charlm exported it?)")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ExportError(f"{path}: its '{META_KEY}' metadata lacks {', '.join(missing)}")
    meta["session"] = session
    return meta


_REQUIRED_META = ("cell", "num_layers", "hidden_size", "embedding_dim", "vocab_size", "preprocess", "tokenizer_sha256",
                  "zero_state_logits", "impl")


def _check_writable(directory: Path) -> None:
    """Refuse (one line) a folder the export cannot write in: tried in the nearest one that exists (nothing is
    created here: the export creates the missing ones, and removes them if it fails)."""
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"--out: {directory} is a file, not a directory")
    existing = next((d for d in (directory, *directory.parents) if d.exists()), directory)
    try:
        with tempfile.NamedTemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ExportError(f"--out: cannot write in {directory} ({exc.strerror or exc})") from None


def replace_tree(src: Path, dest: Path, kind: str, last: str) -> None:
    """Move the finished folder ``src`` to ``dest`` by renames, replacing an earlier export there (checked
    to be charlm's by the caller); the earlier one goes to a fresh temporary name, then is deleted. An existing
    empty folder is filled instead, and kept (:func:`~charlm.outputs.move_into_empty`)."""
    if dest.is_dir() and not any(dest.iterdir()):
        move_into_empty(src, dest, kind, last)
    elif dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=temp_prefix(dest.name) + "old-"))
        try:
            os.replace(dest, old)  # (onto the empty folder just made: a rename, never a merge)
        except OSError:
            old.rmdir()
            raise
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)
