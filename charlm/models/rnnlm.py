"""``RNNLM``: input encoding -> recurrent core -> output layer, one logit per character.

One model contract, as in pytorch/examples' word language model: ``forward(X, state) ->
(logits, state)`` plus ``init_state(batch_size)``. The recurrent core is either torch's kernels
(``impl="torch"``: ``nn.RNN``/``nn.GRU``/``nn.LSTM``, cuDNN on GPUs) or charlm's own cells
(``impl="scratch"``); both have the same ``state_dict`` keys and shapes, so weights move freely
between them and give the same logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import CELLS, IMPLS, ModelConfig, check_choice
from charlm.errors import ConfigError
from charlm.models.scratch import ScratchRecurrent

_TORCH_CORES = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def detach_state(state):
    """Cut the autograd history of a state (tensor or ``(h, c)``): truncated BPTT between batches."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return tuple(s.detach() for s in state)


def recurrent_layer(cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                    dropout: float = 0.0, impl: str = "torch") -> nn.Module:
    """A batch-first recurrent core: torch's ``nn.RNN``/``GRU``/``LSTM`` or charlm's own cells.

    Both take ``(B, T, input_size)`` and a state ``(L, B, H)`` (``(h, c)`` for the LSTM) and return
    ``(output (B, T, H), state)``; their ``state_dict``s are interchangeable. ``dropout`` acts between
    layers only, as in torch. This is what ``RNNLM`` uses, and what a model of real-valued sequences
    (see ``examples/``) builds on.
    """
    check_choice("cell", cell, CELLS)
    if impl == "torch":
        return _TORCH_CORES[cell](input_size, hidden_size, num_layers, batch_first=True, dropout=dropout)
    if impl == "scratch":
        return ScratchRecurrent(cell, input_size, hidden_size, num_layers, dropout)
    raise ConfigError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")


class RNNLM(nn.Module):
    """A character-level recurrent language model.

    ``embedding_dim=0`` feeds one-hot vectors to the recurrent layer as d2l does (its input size is
    then the vocabulary size); ``> 0`` learns an ``nn.Embedding``. The head is dropout followed by a
    linear layer from the hidden state to the vocabulary.
    """

    # The defaults are ModelConfig's (a frozen dataclass keeps each field's default as a class attribute).
    def __init__(self, vocab_size: int, cell: str = ModelConfig.cell, hidden_size: int = ModelConfig.hidden_size,
                 num_layers: int = ModelConfig.num_layers, embedding_dim: int = ModelConfig.embedding_dim,
                 dropout: float = ModelConfig.dropout, impl: str = ModelConfig.impl):
        super().__init__()
        self.config = cfg = ModelConfig(vocab_size=vocab_size, cell=cell, hidden_size=hidden_size,
                                        num_layers=num_layers, embedding_dim=embedding_dim,
                                        dropout=dropout, impl=impl)
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if embedding_dim else None
        # torch applies `dropout` only between layers (and warns when there is one layer).
        inter_layer_dropout = dropout if num_layers > 1 else 0.0
        self.rnn = recurrent_layer(cell, cfg.input_size, hidden_size, num_layers, inter_layer_dropout, impl)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "RNNLM":
        return cls(**config.to_dict())

    def init_state(self, batch_size: int, device=None):
        """The zero state: ``(L, B, H)``, or ``(h, c)`` for the LSTM."""
        cfg = self.config
        p = self.head.weight
        h = torch.zeros(cfg.num_layers, batch_size, cfg.hidden_size, device=device or p.device, dtype=p.dtype)
        return (h, torch.zeros_like(h)) if cfg.cell == "lstm" else h

    def encode_inputs(self, X: torch.Tensor) -> torch.Tensor:
        """What the recurrent core reads for the ids ``X`` (B, T)."""
        if self.embedding is not None:
            return self.embedding(X)  # (B, T, E)
        if self.config.impl == "scratch":
            return X  # (B, T) indices: the scratch core looks up columns of W_ih instead of one-hots
        return F.one_hot(X, self.config.vocab_size).to(self.head.weight.dtype)  # (B, T, V)

    def forward(self, X: torch.Tensor, state=None):
        """``X`` (B, T) int64 ids -> ``(logits (B, T, V), state)``; ``state=None`` means zeros."""
        if state is None:
            state = self.init_state(X.shape[0], device=X.device)
        out, state = self.rnn(self.encode_inputs(X), state)  # out: (B, T, H)
        return self.head(self.dropout(out)), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
