"""Generation with an exported model on onnxruntime (``charlm generate --engine onnx``).

The same loop as :func:`charlm.sample.iter_generate`: the prompt warms the state up (here one
character at a time through the one-step graph), ``<unk>`` is never emitted, and each character is
drawn by :func:`charlm.sample.draw` from each sample's own seeded uniform stream; so a seed gives
the PyTorch path's text, up to float rounding of the logits at a near-tie. Needs the ``onnx`` extra.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from charlm.config import SampleConfig
from charlm.export import ExportError, read_metadata
from charlm.sample import DrawParams, _Uniforms, draw
from charlm.vocab import Vocab

_DEFAULT = SampleConfig()


class OnnxModel:
    """An exported charlm model: its onnxruntime session, its vocabulary (checked against the sha256
    in the model's metadata) and its preprocessing."""

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        import onnxruntime as ort

        self.path = Path(path)
        meta = read_metadata(self.path)
        vocab_path = self.path.parent / "tokenizer.json"
        if not vocab_path.is_file():
            raise ExportError(f"{vocab_path} is missing: the model's vocabulary travels beside it")
        if hashlib.sha256(vocab_path.read_bytes()).hexdigest() != meta["tokenizer_sha256"]:
            raise ExportError(f"{vocab_path} is not the vocabulary {self.path.name} was exported with "
                              f"(its sha256 differs from the model's metadata)")
        self.vocab = Vocab.load(vocab_path)
        self.meta, self.preprocess = meta, meta["preprocess"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # a step is a few small products: one thread is fastest
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.lstm = meta["cell"] == "lstm"
        self.shape = (meta["num_layers"], meta["hidden_size"])
        self.zero_logits = np.asarray(meta["zero_state_logits"], dtype=np.float32)

    def init_state(self, n: int) -> list[np.ndarray]:
        L, H = self.shape
        return [np.zeros((L, n, H), np.float32) for _ in range(2 if self.lstm else 1)]

    def step(self, ids: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (N, V) after reading ``ids`` (N,), and the new state."""
        feed = {"ids": ids, "h": state[0]}
        if self.lstm:
            feed["c"] = state[1]
        logits, *state = self.session.run(None, feed)
        return logits, state

    def iter_generate(self, prefix: str, length: int = _DEFAULT.length, temperature: float = _DEFAULT.temperature,
                      top_k: int | None = _DEFAULT.top_k, top_p: float | None = _DEFAULT.top_p,
                      seed: int | None = _DEFAULT.seed, num_samples: int = _DEFAULT.num_samples,
                      chunk: int = 32) -> Iterator[list[str]]:
        """As :func:`charlm.sample.iter_generate`: every ``chunk`` characters, the next ones of each sample."""
        SampleConfig(length, temperature, top_k, top_p, seed, num_samples)  # validates
        N, itos = num_samples, self.vocab.itos
        logits, state = self.warm_up(self.vocab.encode(prefix), N)
        if temperature == 0 and N == 1:
            yield from self._greedy_one(logits, state, length, chunk)
            return
        uniforms = _Uniforms(seed, N, "cpu") if temperature > 0 else None
        params = DrawParams([(temperature, top_k, top_p)] * N, logits.shape[-1], "cpu")
        pending = []
        for t in range(length):
            ids = draw(torch.from_numpy(logits), params, uniforms.next() if uniforms else None).numpy()
            pending.append(ids)
            if len(pending) == chunk or t + 1 == length:
                block = np.stack(pending, 1).tolist()
                pending = []
                yield ["".join(itos[i] for i in row) for row in block]
            if t + 1 < length:
                logits, state = self.step(ids, state)
                logits[:, 0] = -np.inf

    def warm_up(self, prefix_ids: np.ndarray, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """The prediction after the prefix (``<unk>`` at -inf) and the state it leaves, for ``n`` samples."""
        state = self.init_state(n)
        logits = np.tile(self.zero_logits, (n, 1))
        for i in prefix_ids:
            logits, state = self.step(np.full(n, int(i), dtype=np.int64), state)
        logits = np.array(logits, dtype=np.float32)
        logits[:, 0] = -np.inf
        return logits, state

    def _greedy_one(self, logits, state, length: int, chunk: int) -> Iterator[list[str]]:
        itos, ids = self.vocab.itos, []
        for t in range(length):
            i = int(logits[0].argmax())
            ids.append(i)
            if len(ids) == chunk or t + 1 == length:
                yield ["".join(itos[j] for j in ids)]
                ids = []
            if t + 1 < length:
                logits, state = self.step(np.array([i], dtype=np.int64), state)
                logits[0, 0] = -np.inf
