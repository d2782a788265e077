"""Starting a run from a trained model: ``charlm train CORPUS --init-from RUN`` (``TrainConfig.init_from``).

The new run takes the parent's architecture, vocabulary and preprocessing with its weights; its optimizer,
schedule and run folder are its own. The new text's characters the parent does not know are, by
``new_chars``: an error naming them; read as ``<unk>``; or appended to the vocabulary (``extend``, the
default), the old ids unchanged. Extending grows the input (embedding rows, or the first layer's one-hot
input columns) and the output (the head's rows); :func:`extend_state` starts them so that the extended
model gives every character of the old vocabulary the parent's log-probability:

- a new character's input row (or column) is ``<unk>``'s: the parent read such a character as ``<unk>``;
- ``<unk>``'s output row is copied to each new character and their biases lowered by ``log(k + 1)`` for
  ``k`` new characters: ``<unk>`` and the new characters share, equally, the probability the parent gave
  ``<unk>``, so the sum over them, and every other character's probability, are the parent's.

The run records where it started (:func:`lineage`): the parent's path, its manifest's sha256, its
corpus, step and held-out figure, and the parent's own lineage; ``charlm info`` shows it and exports
carry it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import torch

from charlm.checkpoint import Checkpoint, backup_of, load_checkpoint, resolve_checkpoint_dir
from charlm.config import INHERITED, ModelConfig, TrainConfig
from charlm.errors import CheckpointError, ConfigError, TrainError

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
MAX_GENERATIONS = 32  # ancestors a lineage keeps (a model fine-tuned from a fine-tuned model, ...)


def load_parent(path: str, device: str | torch.device = "cpu") -> Checkpoint:
    """The model to start from, verified as ``charlm eval`` verifies it (a tampered one is refused)."""
    if str(path).lower().endswith(".onnx") and not Path(path).is_dir():
        raise TrainError(f"--init-from {path} is an exported model; fine-tuning starts from a run or a checkpoint: "
                         f"name the run it was exported from")
    try:
        return load_checkpoint(path, device=device)
    except CheckpointError as exc:
        raise TrainError(f"--init-from: {exc}") from None


def check_apart(parent: Checkpoint, out: str | Path) -> None:
    """Refuse (one line) a run folder that holds the model it starts from: ``--overwrite`` would delete it."""
    where, out = Path(parent.path).resolve(), Path(out).resolve()
    if where == out or out in where.parents:
        raise TrainError(f"--init-from {parent.path} lies inside --out {out}, which this run writes (--overwrite "
                         f"would delete the model it starts from); choose another --out")


def check_same_parent(saved: Checkpoint, init_from: str) -> None:
    """On a resume that names ``init_from``: the run must have started from that model (its lineage says)."""
    lineage = saved.lineage
    if lineage is None:
        raise TrainError(f"--init-from {init_from}: the run being resumed did not start from a trained model; "
                         f"resume it without --init-from")
    try:
        named = str(backup_of(resolve_checkpoint_dir(init_from)).resolve())
    except CheckpointError:
        return  # the parent is gone or moved since: the run's own lineage is what counts
    if named != lineage.get("parent"):
        raise TrainError(f"--init-from {init_from}: the run being resumed started from {lineage.get('parent')}; "
                         f"resume it without --init-from")


def parent_settings(parent: Checkpoint) -> dict:
    """The options a fine-tuning run takes from its parent (INHERITED): its architecture and reading of text."""
    cfg = parent.config
    return {"cell": cfg.cell, "impl": cfg.impl, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
            "embedding_dim": cfg.embedding_dim, "mogrify_rounds": cfg.mogrify_rounds, "mogrify_rank": cfg.mogrify_rank,
            "preprocess": parent.preprocess, "min_count": parent.min_count}


def inherit(cfg: TrainConfig, parent: Checkpoint) -> TrainConfig:
    """``cfg`` with the parent's architecture and preprocessing. A field of ``cfg`` set to something other
    than both its default and the parent's value is a ``ConfigError`` (the parent decides those)."""
    inherited = parent_settings(parent)
    clash = [f"{name.replace('_', '-')} {getattr(cfg, name)!r} (the parent's is {value!r})"
             for name, value in inherited.items() if getattr(cfg, name) not in (value, _DEFAULTS[name])]
    if clash:
        raise ConfigError(f"--init-from takes the architecture and preprocessing from {parent.path}; these differ: "
                          + "; ".join(clash))
    return dataclasses.replace(cfg, **inherited)


def extend_state(state: dict, config: ModelConfig, added: int) -> dict:
    """The parent's ``state`` (of a model of ``config``) for a vocabulary of ``added`` more characters, appended
    after the old ids, started as the module docstring says. ``added`` 0 gives ``state`` unchanged."""
    if added == 0:
        return dict(state)
    out = dict(state)
    if config.embedding_dim:
        rows = state["embedding.weight"]  # (V, E)
        out["embedding.weight"] = torch.cat([rows, rows[:1].expand(added, -1)])
    else:
        cols = state["rnn.weight_ih_l0"]  # (G*H, V): one-hot inputs select a column
        out["rnn.weight_ih_l0"] = torch.cat([cols, cols[:, :1].expand(-1, added)], dim=1)
        # a mogrifier's rounds gate the one-hot input element by element: Q's rows (x-sized) and R's columns are
        # per character too (its full matrices', or at a low rank the factor on the input's side)
        for name in ("rnn.weight_q_l0", "rnn.weight_ql_l0"):  # (nQ, V, H) or (nQ, V, k)
            if name in state:
                rows = state[name]
                out[name] = torch.cat([rows, rows[:, :1].expand(-1, added, -1)], dim=1)
        for name in ("rnn.weight_r_l0", "rnn.weight_rr_l0"):  # (nR, H, V) or (nR, k, V)
            if name in state:
                cols = state[name]
                out[name] = torch.cat([cols, cols[..., :1].expand(-1, -1, added)], dim=2)
    weight, bias = state["head.weight"], state["head.bias"]  # (V, H), (V,)
    shared = bias[:1] - math.log(added + 1)  # <unk>'s probability, split over it and the new characters
    out["head.weight"] = torch.cat([weight, weight[:1].expand(added, -1)])
    out["head.bias"] = torch.cat([shared, bias[1:], shared.expand(added)])
    return out


def lineage(parent: Checkpoint, new_chars: str, added: tuple) -> dict:
    """Where a run starts: the parent (its resolved path and manifest's sha256), its corpus, step and held-out
    figure, the parent's own lineage, and what became of the new text's characters it lacked."""
    path = backup_of(parent.path).resolve()  # (read from a backup a cut-short save left: the checkpoint it stands for)
    loss, chars = parent.held_out_figure()
    corpus = parent.corpus_info
    manifest = (parent.path / "manifest.json").read_bytes()
    return {"parent": str(path), "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "corpus": corpus.get("path"), "corpus_sha256": corpus.get("sha256"), "step": parent.progress.get("step"),
            "held_out_bits_per_char": None if loss is None else loss / math.log(2), "held_out_chars": chars,
            "vocab_size": len(parent.vocab), "new_chars": new_chars, "added": [c for c, _ in added]
            if new_chars == "extend" else [], "unknown": [c for c, _ in added] if new_chars == "unk" else [],
            "lineage": _trimmed(parent.lineage, MAX_GENERATIONS - 1)}


def _trimmed(lineage: dict | None, depth: int) -> dict | None:
    """``lineage`` with at most ``depth`` generations (the oldest dropped, and said to be)."""
    if not isinstance(lineage, dict):
        return None
    if depth <= 0:
        return {"parent": "(earlier generations not kept)"}
    return {**lineage, "lineage": _trimmed(lineage.get("lineage"), depth - 1)}


def describe(lineage: dict, indent: str = "") -> list[str]:
    """``charlm info``'s lines for a lineage, the parent's own lineage after it."""
    figure = lineage.get("held_out_bits_per_char")
    lines = [f"{indent}{lineage.get('parent', '?')} (step {lineage.get('step', '?')}"
             + (f", {figure:.4f} bits/char" if isinstance(figure, (int, float)) else "")
             + f", corpus {lineage.get('corpus') or '?'}, manifest sha256 {str(lineage.get('manifest_sha256'))[:12]})"]
    added, unknown = lineage.get("added") or [], lineage.get("unknown") or []
    if added:
        lines.append(f"{indent}  + {len(added)} new character(s) added to its vocabulary: {''.join(added)[:40]!r}")
    if unknown:
        lines.append(f"{indent}  {len(unknown)} character(s) it lacks read as <unk>: {''.join(unknown)[:40]!r}")
    parent = lineage.get("lineage")
    if isinstance(parent, dict):
        lines += [f"{indent}  which started from:", *describe(parent, indent + "  ")]
    return lines
