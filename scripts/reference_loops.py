"""Two training loops written the way people write them, as speed references for `charlm train`.

Both read the corpus with charlm's loader and draw the same sequential batches (d2l's
semantics, state carried and detached between batches), so what differs is the loop itself:

``d2l``: the book's chapter-8 loop. A model that one-hot encodes each batch (``F.one_hot`` on
the time-major ids) and runs ``nn.GRU`` time-major; after ``backward`` a hand-written clipping
that sums the squared gradients parameter by parameter and rescales them in a Python loop when
the norm exceeds the threshold (a host sync to compare); every step converts the loss to a Python
float for the running perplexity (``.item()``, a second sync); plain SGD.

``expert``: what an experienced PyTorch user writes for speed. Embedding -> ``nn.LSTM`` ->
dropout -> linear, batch first; ``clip_grad_norm_(foreach=True)``; ``Adam(foreach=True)``; the
loss is summed on the device and read once at the end; no evaluation, no checkpoints, no
progress bar.

Each prints one line: steps, tokens, seconds of the loop and the final mean training loss.

    python scripts/reference_loops.py d2l corpora/timemachine.txt --epochs 3
    python scripts/reference_loops.py expert corpora/timemachine.txt --max-steps 30
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from charlm import load_corpus
from charlm.data import sequential_batches, split


class D2LModel(nn.Module):
    """The book's concise RNN model: one-hot inputs, a time-major recurrent layer, a linear head."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.rnn = nn.GRU(vocab_size, hidden_size)
        self.linear = nn.Linear(hidden_size, vocab_size)

    def forward(self, inputs, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size).to(torch.float32)  # (T, B, V), built every step
        Y, state = self.rnn(X, state)
        return self.linear(Y.reshape(-1, Y.shape[-1])), state  # (T*B, V)


def hand_clip(model: nn.Module, theta: float) -> None:
    """Clipping as the book writes it: a Python sum over parameters, then a comparison on the host."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.sqrt(sum(torch.sum(p.grad**2) for p in params))
    if norm > theta:  # host sync
        for p in params:
            p.grad[:] *= theta / norm


def batches(args, train_ids):
    """``(first batch of an epoch?, X, Y)`` over ``args.epochs`` epochs, at most ``args.max_steps``."""
    steps = 0
    for epoch in range(args.epochs):
        for k, (X, Y) in enumerate(sequential_batches(train_ids, args.batch_size, args.num_steps,
                                                      seed=args.seed, epoch=epoch)):
            if args.max_steps and steps >= args.max_steps:
                return
            yield k == 0, X, Y
            steps += 1


def d2l_loop(args, train_ids, vocab_size):
    torch.manual_seed(args.seed)
    model = D2LModel(vocab_size, args.hidden_size)
    updater = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    steps, loss_total, tokens, state = 0, 0.0, 0, None
    for new_epoch, X, Y in batches(args, train_ids):
        state = None if new_epoch else state.detach()  # each epoch starts from a zero state
        y = Y.T.reshape(-1)  # time-major targets, as the model's outputs
        y_hat, state = model(X, state)
        loss = loss_fn(y_hat, y.long()).mean()
        updater.zero_grad()
        loss.backward()
        hand_clip(model, args.clip)
        updater.step()
        loss_total += loss.item() * y.numel()  # per-step host sync for the running perplexity
        tokens += y.numel()
        steps += 1
    return steps, tokens, loss_total / max(tokens, 1)


class ExpertModel(nn.Module):
    def __init__(self, vocab_size, embedding_dim, hidden_size, num_layers, dropout):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.rnn = nn.LSTM(embedding_dim, hidden_size, num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, X, state=None):
        out, state = self.rnn(self.embedding(X), state)
        return self.head(self.drop(out)), state


def expert_loop(args, train_ids, vocab_size):
    torch.manual_seed(args.seed)
    model = ExpertModel(vocab_size, args.embedding_dim, args.hidden_size, args.num_layers, args.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, foreach=True)
    loss_sum = torch.zeros(())
    steps, tokens, state = 0, 0, None
    for new_epoch, X, Y in batches(args, train_ids):
        state = None if new_epoch else tuple(s.detach() for s in state)
        logits, state = model(X, state)
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), Y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip, foreach=True)
        opt.step()
        loss_sum += loss.detach()
        steps += 1
        tokens += Y.numel()
    return steps, tokens, loss_sum.item() / max(steps, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("loop", choices=("d2l", "expert"))
    ap.add_argument("corpus")
    ap.add_argument("--preprocess", default="raw")
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--num-layers", type=int, default=2, help="expert only")
    ap.add_argument("--embedding-dim", type=int, default=64, help="expert only")
    ap.add_argument("--dropout", type=float, default=0.5, help="expert only")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--num-steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--val-fraction", type=float, default=0.1, help="tail held out (not trained on), as charlm train splits")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # The book's configuration and the expert one, unless overridden.
    defaults = {"d2l": dict(hidden_size=256, batch_size=32, num_steps=35, lr=1.0),
                "expert": dict(hidden_size=512, batch_size=128, num_steps=100, lr=3e-3)}[args.loop]
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    corpus = load_corpus(args.corpus, preprocess=args.preprocess)
    train_ids, _ = split(corpus.ids, args.val_fraction)
    t0 = time.perf_counter()
    loop = d2l_loop if args.loop == "d2l" else expert_loop
    steps, tokens, loss = loop(args, train_ids, len(corpus.vocab))
    seconds = time.perf_counter() - t0
    print(f"{args.loop}: {steps} steps, {tokens:,} tokens in {seconds:.2f}s ({tokens / seconds:,.0f} tokens/s), "
          f"mean training loss {loss:.3f} (perplexity {math.exp(loss):.2f})")
    return steps, tokens, seconds, loss


if __name__ == "__main__":
    main()
