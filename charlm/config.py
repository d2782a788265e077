"""Typed, frozen settings. Every default is defined here, once.

A checkpoint stores ``ModelConfig.to_dict()`` as JSON and rebuilds the model from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

CELLS = ("rnn", "gru", "lstm")
IMPLS = ("torch", "scratch")


def _from_dict(cls, data: dict):
    """Build dataclass ``cls`` from ``data``, refusing keys it does not know."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of an :class:`~charlm.models.RNNLM`: everything needed to rebuild it."""

    vocab_size: int  # characters, <unk> included; the size of the one-hot input and of the output
    cell: str = "gru"  # "rnn" (tanh), "gru" or "lstm", with torch's gate equations
    hidden_size: int = 256  # H: units per recurrent layer
    num_layers: int = 1  # stacked recurrent layers
    embedding_dim: int = 0  # 0: one-hot inputs, as in d2l; > 0: a learned nn.Embedding of this size
    dropout: float = 0.0  # between recurrent layers and before the output layer (training only)
    impl: str = "torch"  # "torch": nn.RNN/GRU/LSTM kernels (cuDNN on GPUs); "scratch": charlm's own cells

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; choose one of {', '.join(IMPLS)}")
        for name in ("vocab_size", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.embedding_dim, int) or self.embedding_dim < 0:
            raise ValueError(f"embedding_dim must be an integer >= 0 (0 = one-hot), got {self.embedding_dim!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")

    @property
    def input_size(self) -> int:
        """What the first recurrent layer reads: the vocabulary (one-hot) or the embedding."""
        return self.embedding_dim or self.vocab_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return _from_dict(cls, data)
