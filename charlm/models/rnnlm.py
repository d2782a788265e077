"""``RNNLM``: input encoding -> recurrent core -> output layer, one logit per character.

One model contract, as in pytorch/examples' word language model: ``forward(X, state) ->
(logits, state)`` plus ``init_state(batch_size)``. The recurrent core is either torch's kernels
(``impl="torch"``: ``nn.RNN``/``nn.GRU``/``nn.LSTM``, cuDNN on GPUs) or charlm's own cells
(``impl="scratch"``); both have the same ``state_dict`` keys and shapes, so weights move freely
between them and give the same logits. The Mogrifier LSTM (``cell="mogrifier"``, which torch lacks) is
charlm's own in both: its fast form for ``"torch"``, its teaching form for ``"scratch"``
(:mod:`charlm.models.mogrifier`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import CELLS, IMPLS, PAIR_STATE_CELLS, REGULARISERS, ModelConfig, check_choice
from charlm.errors import ConfigError
from charlm.models.mogrifier import MogrifierLSTM
from charlm.models.scratch import ScratchRecurrent

_TORCH_CORES = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
_TORCH_LAYER_KERNELS = {"rnn": torch.rnn_tanh, "gru": torch.gru}  # torch.lstm takes (h, c): see _torch_layer


def locked_mask(batch: int, features: int, p: float, like: torch.Tensor) -> torch.Tensor | None:
    """A locked (variational) dropout mask (B, 1, F): one draw per sequence and feature, the same at every
    time step (Gal and Ghahramani, 2016), scaled by 1 / (1 - p); None when ``p`` is 0."""
    if not p:
        return None
    return torch.empty(batch, 1, features, device=like.device, dtype=like.dtype).bernoulli_(1 - p) / (1 - p)


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def _torch_layer(cell: str, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, weights: tuple):
    """One layer of torch's fused kernel (oneDNN on CPUs, cuDNN on GPUs) with the weights given: what
    ``nn.LSTM`` runs, but with a hidden-to-hidden matrix the caller may have dropped. ``x`` (B, T, I),
    ``h``/``c`` (B, H). Returns ``(out (B, T, H), h, c)``."""
    hx = h.unsqueeze(0)  # (1, B, H)
    if cell == "lstm":
        out, h, c = torch.lstm(x, (hx, c.unsqueeze(0)), weights, True, 1, 0.0, True, False, True)
        return out, h[0], c[0]
    out, h = _TORCH_LAYER_KERNELS[cell](x, hx, weights, True, 1, 0.0, True, False, True)
    return out, h[0], None


def detach_state(state):
    """Cut the autograd history of a state (tensor or ``(h, c)``): truncated BPTT between batches."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return tuple(s.detach() for s in state)


def recurrent_layer(cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                    dropout: float = 0.0, impl: str = "torch", mogrify_rounds: int = ModelConfig.mogrify_rounds,
                    mogrify_rank: int = ModelConfig.mogrify_rank) -> nn.Module:
    """A batch-first recurrent core: torch's ``nn.RNN``/``GRU``/``LSTM`` or charlm's own cells.

    Both take ``(B, T, input_size)`` and a state ``(L, B, H)`` (``(h, c)`` for the LSTM and the mogrifier)
    and return ``(output (B, T, H), state)``; their ``state_dict``s are interchangeable. ``dropout`` acts
    between layers only, as in torch. This is what ``RNNLM`` uses, and what a model of real-valued sequences
    (see ``examples/``) builds on.
    """
    check_choice("cell", cell, CELLS)
    if cell == "mogrifier":
        return MogrifierLSTM(input_size, hidden_size, num_layers, dropout, mogrify_rounds, mogrify_rank, impl)
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
                 dropout: float = ModelConfig.dropout, impl: str = ModelConfig.impl,
                 weight_drop: float = ModelConfig.weight_drop, dropout_input: float = ModelConfig.dropout_input,
                 dropout_hidden: float = ModelConfig.dropout_hidden,
                 dropout_output: float = ModelConfig.dropout_output,
                 mogrify_rounds: int = ModelConfig.mogrify_rounds, mogrify_rank: int = ModelConfig.mogrify_rank):
        super().__init__()
        self.config = cfg = ModelConfig(vocab_size=vocab_size, cell=cell, hidden_size=hidden_size,
                                        num_layers=num_layers, embedding_dim=embedding_dim,
                                        dropout=dropout, impl=impl, weight_drop=weight_drop,
                                        dropout_input=dropout_input, dropout_hidden=dropout_hidden,
                                        dropout_output=dropout_output, mogrify_rounds=mogrify_rounds,
                                        mogrify_rank=mogrify_rank)
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if embedding_dim else None
        # torch applies `dropout` only between layers (and warns when there is one layer).
        inter_layer_dropout = dropout if num_layers > 1 else 0.0
        self.rnn = recurrent_layer(cell, cfg.input_size, hidden_size, num_layers, inter_layer_dropout, impl,
                                   mogrify_rounds, mogrify_rank)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "RNNLM":
        return cls(**config.to_dict())

    def init_state(self, batch_size: int, device=None):
        """The zero state: ``(L, B, H)``, or ``(h, c)`` for the LSTM and the mogrifier."""
        cfg = self.config
        p = self.head.weight
        h = torch.zeros(cfg.num_layers, batch_size, cfg.hidden_size, device=device or p.device, dtype=p.dtype)
        return (h, torch.zeros_like(h)) if cfg.cell in PAIR_STATE_CELLS else h

    def encode_inputs(self, X: torch.Tensor) -> torch.Tensor:
        """What the recurrent core reads for the ids ``X`` (B, T)."""
        if self.embedding is not None:
            return self.embedding(X)  # (B, T, E)
        if self.config.impl == "scratch":
            return X  # (B, T) indices: the scratch core looks up columns of W_ih instead of one-hots (or makes them)
        return F.one_hot(X, self.config.vocab_size).to(self.head.weight.dtype)  # (B, T, V)

    def forward(self, X: torch.Tensor, state=None):
        """``X`` (B, T) int64 ids -> ``(logits (B, T, V), state)``; ``state=None`` means zeros."""
        if state is None:
            state = self.init_state(X.shape[0], device=X.device)
        if self.training and self.config.regularised:
            return self.regularised_forward(X, state, self.draw_masks(X.shape[0]))
        out, state = self.rnn(self.encode_inputs(X), state)  # out: (B, T, H)
        return self.head(self.dropout(out)), state

    def draw_masks(self, batch: int) -> dict:
        """This batch's regularisation masks: ``weight_hh_l{k}`` (G*H, H) DropConnect masks, ``input``,
        ``hidden_l{k}`` (between layers k and k+1) and ``output`` locked masks (B, 1, F); absent when off."""
        cfg, w = self.config, self.head.weight
        masks = {}
        if cfg.weight_drop:
            for k in range(cfg.num_layers):
                w_hh = getattr(self.rnn, f"weight_hh_l{k}")
                # uniform >= p keeps a weight with probability 1 - p; in place on one buffer: this runs every
                # step on G*H*H numbers per layer, and bernoulli_ took twice as long (3 ms at 4 x 320 x 320)
                masks[f"weight_hh_l{k}"] = torch.rand_like(w_hh).ge_(cfg.weight_drop).mul_(1 / (1 - cfg.weight_drop))
        sizes = {"input": cfg.input_size, "output": cfg.hidden_size,
                 **{f"hidden_l{k}": cfg.hidden_size for k in range(cfg.num_layers - 1)}}
        rates = {"input": cfg.dropout_input, "output": cfg.dropout_output,
                 **{f"hidden_l{k}": cfg.dropout_hidden for k in range(cfg.num_layers - 1)}}
        for name, size in sizes.items():
            mask = locked_mask(batch, size, rates[name], w)
            if mask is not None:
                masks[name] = mask
        return masks

    def regularised_forward(self, X: torch.Tensor, state, masks: dict):
        """The forward pass under ``masks`` (see :meth:`draw_masks`): the layers run one at a time, each
        through the same kernel as without regularisation, with its dropped hidden-to-hidden matrix.
        ``--dropout`` keeps its meaning on top (between layers and before the head)."""
        cfg = self.config
        x = self.encode_inputs(X)
        if "input" in masks:
            if not x.is_floating_point():  # the scratch core's one-hot indices: make the vectors to drop from
                x = F.one_hot(x, cfg.vocab_size).to(self.head.weight.dtype)
            x = x * masks["input"]
        h0, c0 = state if cfg.cell in PAIR_STATE_CELLS else (state, None)
        hs, cs = [], []
        for k in range(cfg.num_layers):
            w_hh = getattr(self.rnn, f"weight_hh_l{k}")
            w_hh = _masked(w_hh, masks.get(f"weight_hh_l{k}"))
            c = None if c0 is None else c0[k]
            if cfg.impl == "scratch" or cfg.cell == "mogrifier":
                x, h, c = self.rnn.run_layer(k, x, h0[k], c, w_hh=w_hh)
            else:
                w_ih, b_ih, b_hh = (getattr(self.rnn, f"{n}_l{k}") for n in ("weight_ih", "bias_ih", "bias_hh"))
                x, h, c = _torch_layer(cfg.cell, x, h0[k], c, (w_ih, w_hh, b_ih, b_hh))
            hs.append(h)
            cs.append(c)
            if k < cfg.num_layers - 1:
                x = F.dropout(_masked(x, masks.get(f"hidden_l{k}")), self.rnn.dropout, training=True)
        new_state = (torch.stack(hs), torch.stack(cs)) if cfg.cell in PAIR_STATE_CELLS else torch.stack(hs)
        return self.head(self.dropout(_masked(x, masks.get("output")))), new_state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
