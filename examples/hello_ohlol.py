"""hello -> ohlol: a recurrent network learns a five-character mapping.

What it teaches. The input is the characters of "hello" and the target, position by position, is
"ohlol". A feed-forward network that sees one character at a time cannot learn it: the two "l"s
must map to different characters ("l" then "o"), so the network has to remember where it is. A
recurrent state is that memory.

The same mapping is learnt two ways, with charlm's own models (``charlm.RNNLM``, both
``impl="torch"`` and ``impl="scratch"``):

1. the ``RNNCell`` way: the model is called once per character, and the state it returns is
   passed back in with the next character, exactly as a hand-written loop over a bare cell does;
2. whole sequences: one call runs the RNN, GRU or LSTM layer over all five characters, with
   one-hot inputs (``embedding_dim=0``, as in d2l) or a small learnt embedding.

For every variant and every seed in a small sweep it prints the predictions as they change and the
epoch (one Adam step on the one training pair) at which the prediction first reads "ohlol".

    python examples/hello_ohlol.py            # 10 seeds, a few seconds
    python examples/hello_ohlol.py --quick    # 3 seeds

The torch and scratch rows come out identical: charlm's cells create their parameters in torch's
order and shapes, so one seed gives both the same initial weights, and they compute the same
function.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from charlm import RNNLM, Vocab

SOURCE, TARGET = "hello", "ohlol"
HIDDEN = 8
LR = 0.1
MAX_EPOCHS = 100  # every variant must reach "ohlol" within this many epochs, for every seed


def variants():
    """(name, keyword arguments of RNNLM, stepped one character at a time?)"""
    out = []
    for impl in ("torch", "scratch"):
        out.append((f"rnn cell stepped by hand, {impl}", dict(cell="rnn", embedding_dim=0, impl=impl), True))
    for cell in ("rnn", "gru", "lstm"):
        for emb in (0, 4):
            for impl in ("torch", "scratch"):
                enc = "one-hot" if emb == 0 else f"embedding {emb}"
                out.append((f"{cell} layer, {enc}, {impl}", dict(cell=cell, embedding_dim=emb, impl=impl), False))
    return out


def forward_stepped(model: RNNLM, x: torch.Tensor) -> torch.Tensor:
    """The RNNCell way: one call per character, the state handed from each call to the next."""
    state = model.init_state(x.shape[0])
    logits = []
    for t in range(x.shape[1]):
        step_logits, state = model(x[:, t : t + 1], state)  # (1, 1, V)
        logits.append(step_logits)
    return torch.cat(logits, dim=1)  # (1, T, V)


def learn(kwargs: dict, stepped: bool, vocab: Vocab, seed: int, log=None):
    """Train until the prediction reads TARGET; return (first epoch that did, predictions seen)."""
    torch.manual_seed(seed)
    model = RNNLM(len(vocab), hidden_size=HIDDEN, **kwargs)
    x = torch.as_tensor(vocab.encode(SOURCE), dtype=torch.long)[None]  # (1, 5)
    y = torch.as_tensor(vocab.encode(TARGET), dtype=torch.long)[None]  # (1, 5)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    seen = []
    for epoch in range(1, MAX_EPOCHS + 1):
        logits = forward_stepped(model, x) if stepped else model(x)[0]  # (1, 5, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # The prediction of the weights just used (the logits above): argmax at each position.
        predicted = vocab.decode(logits.argmax(-1)[0].tolist())
        if not seen or seen[-1][1] != predicted:
            seen.append((epoch, predicted))
            if log:
                log(f"    epoch {epoch:3d}  loss {loss.item():.3f}  predicts {predicted!r}")
        if predicted == TARGET:
            return epoch, seen
    return None, seen


def run(quick: bool = False, seed: int = 0, out: str | Path = "runs/hello_ohlol", verbose: bool = True) -> dict:
    torch.set_num_threads(1)  # tensors of a few dozen numbers: threads only add overhead
    vocab = Vocab(sorted(set(SOURCE + TARGET)))  # h, e, l, o (and <unk> at id 0, never a target)
    seeds = list(range(seed, seed + (3 if quick else 10)))
    say = print if verbose else (lambda *a: None)
    say(f"learning {SOURCE!r} -> {TARGET!r}: hidden {HIDDEN}, Adam lr {LR}, one step per epoch, seeds {seeds}")
    results = {}
    for name, kwargs, stepped in variants():
        epochs = []
        for s in seeds:
            log = say if s == seeds[0] else None  # show how the first seed's predictions evolve
            if log:
                say(f"{name} (seed {s})")
            epoch, _ = learn(kwargs, stepped, vocab, s, log)
            epochs.append(epoch)
        results[name] = epochs
    say("")
    say(f"| variant | epoch of the first 'ohlol', seeds {seeds[0]}..{seeds[-1]} | worst |")
    say("|---|---|---|")
    for name, epochs in results.items():
        worst = "never" if None in epochs else max(epochs)
        say(f"| {name} | {', '.join('never' if e is None else str(e) for e in epochs)} | {worst} |")
    failed = [n for n, e in results.items() if None in e]
    say(f"every variant reached {TARGET!r} within {MAX_EPOCHS} epochs for every seed" if not failed
        else f"not reached within {MAX_EPOCHS} epochs: {', '.join(failed)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"seeds": seeds, "epochs": results}, indent=1) + "\n")
    return {"seeds": seeds, "epochs": results, "max_epochs": MAX_EPOCHS}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds instead of 10")
    parser.add_argument("--seed", type=int, default=0, help="first seed of the sweep")
    parser.add_argument("--out", default="runs/hello_ohlol", help="where results.json goes")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.quick, args.seed, args.out)
    print(f"({time.perf_counter() - start:.1f} s)")
    return result


if __name__ == "__main__":
    main()
