"""Generation and evaluation with an exported model on onnxruntime (``charlm generate --engine onnx``,
``charlm eval MODEL.onnx``).

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

from charlm.checkpoint import RunCorpus
from charlm.config import EVAL_BATCH_SIZE, EVAL_NUM_STEPS, PAIR_STATE_CELLS, SampleConfig
from charlm.export.graph import ExportError, read_metadata, tokenizer_path
from charlm.sample import DrawParams, _Uniforms, draw
from charlm.vocab import Vocab

_DEFAULT = SampleConfig()


class OnnxModel(RunCorpus):
    """An exported charlm model: its onnxruntime session, its vocabulary (checked against the sha256
    in the model's metadata) and its preprocessing.

    ``threads`` (onnxruntime's intra-op threads): by default torch's thread count for a model whose
    step reads at least ``MIN_BLOCK_BYTES`` of weights per thread, else one (a small model's step is
    a few vector-sized products, which threads only slow down; see :func:`step_threads`)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        meta = read_metadata(self.path)
        vocab_path = tokenizer_path(self.path)
        if not vocab_path.is_file() and (self.path.parent / "tokenizer.json").is_file():
            vocab_path = self.path.parent / "tokenizer.json"  # the name exports gave it before NAME.tokenizer.json
        if not vocab_path.is_file():
            raise ExportError(f"{vocab_path} is missing: the model's vocabulary travels beside it")
        if hashlib.sha256(vocab_path.read_bytes()).hexdigest() != meta["tokenizer_sha256"]:
            raise ExportError(f"{vocab_path} is not the vocabulary {self.path.name} was exported with "
                              f"(its sha256 differs from the model's metadata)")
        self.vocab, self.vocab_path = Vocab.load(vocab_path), vocab_path
        self.meta, self.preprocess = meta, meta["preprocess"]
        self.threads = step_threads(meta) if threads is None else threads
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.lstm = meta["cell"] in PAIR_STATE_CELLS  # a state (h, c)
        self.shape = (meta["num_layers"], meta["hidden_size"])
        self.zero_logits = np.asarray(meta["zero_state_logits"], dtype=np.float32)

    @property
    def corpus_info(self) -> dict:
        """The run's corpus as the checkpoint knew it (path, preprocessing, split, sha256); {} for exports
        made before the metadata kept it."""
        return dict(self.meta.get("corpus") or {})

    @property
    def quantization(self) -> str | None:
        """None for fp32 weights, "int8" for a model exported with --quantize int8."""
        return self.meta.get("quantization")

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

    def stepper(self, n: int) -> "BoundStep":
        """A generation loop's step for ``n`` sequences, from the zero state, on buffers bound once."""
        return BoundStep(self.session, n, self.shape, self.lstm, len(self.zero_logits))

    def iter_generate(self, prefix: str, length: int = _DEFAULT.length, temperature: float = _DEFAULT.temperature,
                      top_k: int | None = _DEFAULT.top_k, top_p: float | None = _DEFAULT.top_p,
                      seed: int | None = _DEFAULT.seed, num_samples: int = _DEFAULT.num_samples,
                      chunk: int = 32) -> Iterator[list[str]]:
        """As :func:`charlm.sample.iter_generate`: every ``chunk`` characters, the next ones of each sample."""
        SampleConfig(length, temperature, top_k, top_p, seed, num_samples)  # validates
        N, itos = num_samples, self.vocab.itos
        run = self.stepper(N)
        logits = self.warm_up(self.vocab.encode(prefix), run)
        if temperature == 0 and N == 1:
            yield from self._greedy_one(logits, run, length, chunk)
            return
        uniforms = _Uniforms(seed, N, "cpu") if temperature > 0 else None
        params = DrawParams([(temperature, top_k, top_p)] * N, logits.shape[-1], "cpu")
        threads = torch.get_num_threads()
        # torch only draws here, on (N, V): one thread, so that its threads do not fight onnxruntime's
        # (which spin between steps): x64 at T 0.8, 2 x LSTM 320: 46-48k chars/s against 12.8k
        torch.set_num_threads(1)
        try:
            pending = []
            for t in range(length):
                ids = draw(torch.from_numpy(logits), params, uniforms.next() if uniforms else None).numpy()
                pending.append(ids)
                if len(pending) == chunk or t + 1 == length:
                    block = np.stack(pending, 1).tolist()
                    pending = []
                    yield ["".join(itos[i] for i in row) for row in block]
                if t + 1 < length:
                    logits = run.step(ids)
                    logits[:, 0] = -np.inf
        finally:
            torch.set_num_threads(threads)  # (between yields, the caller too runs on the one thread)

    def warm_up(self, prefix_ids: np.ndarray, run: "BoundStep") -> np.ndarray:
        """The prediction after the prefix (``<unk>`` at -inf), with ``run`` (fresh) left in the state it reaches."""
        logits = np.tile(self.zero_logits, (run.n, 1))
        for i in prefix_ids:
            logits = run.step(int(i))
        logits[:, 0] = -np.inf
        return logits

    def _greedy_one(self, logits, run: "BoundStep", length: int, chunk: int) -> Iterator[list[str]]:
        itos, ids = self.vocab.itos, []
        for t in range(length):
            i = int(logits[0].argmax())
            ids.append(i)
            if len(ids) == chunk or t + 1 == length:
                yield ["".join(itos[j] for j in ids)]
                ids = []
            if t + 1 < length:
                logits = run.step(i)
                logits[0, 0] = -np.inf


def step_threads(meta: dict) -> int:
    """onnxruntime threads for a model: torch's thread count, at most one per ``MIN_BLOCK_BYTES`` of the
    weights a step reads (the rule charlm's PyTorch path uses to split one sequence's products).

    Measured here (2 cores, greedy chars/s, 1 thread against 2): 2 x LSTM 320 3,500 against 5,900;
    2 x LSTM 512 1,660 against 2,680; 2 x GRU 128 (0.6 MB) 26,700 against 25,100; 1 x LSTM 64 59,000
    against 54,000."""
    from charlm.models.stepper import MIN_BLOCK_BYTES, step_bytes

    weights = step_bytes(meta["cell"], meta["num_layers"], meta["hidden_size"], meta["vocab_size"],
                         meta.get("embedding_dim", 0), meta.get("mogrify_rounds", 0))
    return max(1, min(torch.get_num_threads(), weights // MIN_BLOCK_BYTES))


class BoundStep:
    """One step for a fixed ``n`` with onnxruntime's I/O binding: the ids, the logits and two state
    buffers are numpy arrays bound once, and the two states are used in turn (one step's output is the
    next one's input), so a step allocates and copies nothing (single-stream greedy on the quickstart
    model: 7-15% more characters/s than ``session.run``). :meth:`step`'s logits are overwritten by the next."""

    def __init__(self, session, n: int, shape: tuple[int, int], lstm: bool, vocab_size: int):
        import onnxruntime as ort

        value = ort.OrtValue.ortvalue_from_numpy
        self.session, self.n, self.turn = session, n, 0
        self.ids, self.logits = np.zeros(n, np.int64), np.zeros((n, vocab_size), np.float32)
        names = (("h", "h_out"), ("c", "c_out"))[:2 if lstm else 1]
        self.states = [[np.zeros((shape[0], n, shape[1]), np.float32) for _ in names] for _ in range(2)]
        ids, logits = value(self.ids), value(self.logits)
        states = [[value(a) for a in pair] for pair in self.states]
        self.values = [ids, logits, states]  # (kept alive with the bindings)
        self.bindings = []
        for a in range(2):
            binding = session.io_binding()
            binding.bind_ortvalue_input("ids", ids)
            binding.bind_ortvalue_output("logits", logits)
            for (name_in, name_out), now, after in zip(names, states[a], states[1 - a]):
                binding.bind_ortvalue_input(name_in, now)
                binding.bind_ortvalue_output(name_out, after)
            self.bindings.append(binding)

    def step(self, ids) -> np.ndarray:
        """The logits (n, V) after reading ``ids`` (an int for every row, or one per row)."""
        self.ids[:] = ids
        self.session.run_with_iobinding(self.bindings[self.turn])
        self.turn ^= 1
        return self.logits


def evaluate_onnx(model: OnnxModel, ids, batch_size: int = EVAL_BATCH_SIZE, num_steps: int = EVAL_NUM_STEPS,
                  progress=None):
    """A :class:`charlm.EvalResult`: the mean next-character cross-entropy of the exported ``model`` over ``ids``, read as
    :func:`charlm.evaluate` reads them: ``B = min(batch_size, (n-1) // 2)`` rows of ``(n-1) // B``
    characters, each row's first prediction made after its first character, the state carried from
    the zero state to the row's end (one onnxruntime step per column, the B rows together), and the
    model's whole distribution (``<unk>`` included) scored in float64. So an fp32 export gives the
    checkpoint's figure up to float rounding. ``progress(done, total)`` follows the columns."""
    from charlm.data import _as_numpy
    from charlm.evaluation import EvalResult, _rows
    from charlm.tokens import windows

    ids = _as_numpy(ids)
    B, cols, row_starts = _rows(len(ids), batch_size)
    run = model.stepper(B)
    total = 0.0
    rows = np.arange(B)
    for start in range(0, cols, num_steps):  # a block of columns at a time: the text is never read whole
        width = min(num_steps, cols - start)
        block = windows(ids, row_starts + start, width + 1).astype(np.int64)  # (B, width+1)
        for t in range(width):
            logits = run.step(block[:, t]).astype(np.float64)  # (B, V): after reading column t
            top = logits.max(axis=1)
            log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
            total += float((log_z - logits[rows, block[:, t + 1]]).sum())
        if progress is not None:
            progress(start + width, cols)
    return EvalResult(loss=total / (B * cols), tokens=B * cols)
