"""Checkpoints: atomic save, safe load, a format version, a manifest of checksums.

A checkpoint is a directory::

    model.pt        the model's state_dict (tensors only)
    trainer.pt      optimizer state, RNG states, carried hidden state (tensors and plain values)
    config.json     format version, model config (to rebuild it), training config, progress
    tokenizer.json  the vocabulary (HuggingFace tokenizers format)
    manifest.json   sha256 of each file above

Loading never unpickles code (``torch.load(weights_only=True)``, no fallback), maps tensors to the
chosen device (a GPU checkpoint loads on a CPU-only machine) and checks every file against the
manifest, so a tampered or truncated checkpoint is refused with one line.

Saving writes a sibling temporary directory and renames it into place. Replacing an existing
checkpoint takes two renames (old -> ``NAME.old``, new -> ``NAME``); a kill between them leaves
``NAME.old``, which :func:`load_checkpoint` and the next save fall back to. So at any instant one
complete checkpoint can be loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from charlm.config import ModelConfig, TrainConfig
from charlm.errors import CheckpointError, os_error_line
from charlm.models import RNNLM
from charlm.outputs import KINDS, check_folder, check_not_cwd
from charlm.vocab import Vocab

FORMAT_VERSION = 1
FILES = ("model.pt", "trainer.pt", "config.json", "tokenizer.json")


class RunCorpus:
    """What a saved model knows of the corpus its run trained on, from ``corpus_info`` (a dict): the
    places that read a held-out text back (:func:`charlm.evaluation.held_out_ids`) need only these."""

    corpus_info: dict

    @property
    def corpus_path(self) -> Path | None:
        path = self.corpus_info.get("path")
        return Path(path) if path else None

    @property
    def val_fraction(self) -> float:
        return self.corpus_info.get("val_fraction", TrainConfig.val_fraction)

    @property
    def min_count(self) -> int:
        return self.corpus_info.get("min_count", TrainConfig.min_count)


@dataclass
class Checkpoint(RunCorpus):
    """A loaded checkpoint. ``meta`` is what ``config.json`` holds besides the model's config; the
    properties below are the only places that know its layout."""

    model: RNNLM
    vocab: Vocab
    config: ModelConfig
    meta: dict  # everything else config.json holds: train config, corpus, progress, versions
    trainer_state: dict | None = field(default=None, repr=False)
    path: Path | None = None

    @property
    def train_options(self) -> dict:
        """The ``TrainConfig`` of the run that wrote it, as a dict (empty when saved outside a run)."""
        return dict(self.meta.get("train", {}))

    @property
    def corpus_info(self) -> dict:
        return dict(self.meta.get("corpus", {}))

    @property
    def preprocess(self) -> str:
        """How the corpus was normalised; apply the same to a prompt or an evaluation file."""
        return self.corpus_info.get("preprocess", TrainConfig.preprocess)

    @property
    def progress(self) -> dict:
        """``step``, ``epoch``, ``best_val_loss``, ... at the time of saving."""
        return dict(self.meta.get("progress", {}))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _torch_save(obj, path: Path) -> None:
    # Serialised in memory, then written by Python: a full disk is an OSError (ENOSPC), where torch's
    # own writer would fail with a RuntimeError about zip offsets.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getbuffer())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _named(path: str | os.PathLike) -> Path:
    """``path``, made absolute when it has no name of its own (``.``, ``..``), so that its siblings can be named."""
    path = Path(path)
    return path if path.name else path.resolve()


def _checkpoint_files_only(path: Path) -> bool:
    """Whether the folder ``path`` holds only the files a checkpoint is made of (a manifest not required:
    a deletion that a kill interrupted may have taken it first)."""
    try:
        return path.is_dir() and not path.is_symlink() and all(
            p.name in KINDS["checkpoint"] for p in path.iterdir())
    except OSError:
        return False


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a complete checkpoint folder charlm wrote, holding nothing else."""
    return _checkpoint_files_only(path) and (path / "manifest.json").is_file()


def recover(path: str | os.PathLike) -> None:
    """Finish a replacement that a kill interrupted: put ``NAME.old`` back if ``NAME`` is missing, or delete
    it if ``NAME`` is there. Only a ``NAME.old`` made of a checkpoint's files is moved or deleted: a folder
    of that name that charlm did not write (``project.old`` beside ``project``) is left alone."""
    path = _named(path)
    if not path.name:  # the root folder
        return
    old = path.with_name(path.name + ".old")
    if not path.exists():
        if _is_checkpoint(old):
            os.replace(old, path)
    elif _is_checkpoint(path) and _checkpoint_files_only(old):
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(path: str | os.PathLike, model: RNNLM, vocab: Vocab, meta: dict | None = None,
                    trainer_state: dict | None = None) -> Path:
    """Write a complete checkpoint to ``path`` atomically (see the module docstring).

    A failure to write (an unwritable place, a full disk) is a one-line ``CheckpointError``, and
    whatever checkpoint was at ``path`` before is still there. ``path`` must be new, an empty folder
    or a checkpoint: a folder or file charlm did not write is refused (:class:`~charlm.outputs.NotOwnedError`)
    and left as it is.
    """
    path = _named(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"cannot write checkpoint {path}: {parent} is not a directory")
            break
    check_folder(path, "checkpoint", option="checkpoint")
    check_not_cwd(path, option="checkpoint")  # (it is replaced by a rename: the caller's folder would vanish)
    if not path.name:
        raise CheckpointError(f"cannot write checkpoint {path}: name a folder for it")
    try:
        return _save(path, model, vocab, meta, trainer_state)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {os_error_line(exc)}") from None


def _save(path: Path, model: RNNLM, vocab: Vocab, meta: dict | None, trainer_state: dict | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        _torch_save(state_dict, tmp / "model.pt")
        _torch_save(trainer_state or {}, tmp / "trainer.pt")
        config = {
            "format_version": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "torch_version": torch.__version__,
            **(meta or {}),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        vocab.save(tmp / "tokenizer.json")
        manifest = {name: _sha256(tmp / name) for name in FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        for name in (*FILES, "manifest.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        old = path.with_name(path.name + ".old")
        replacing = path.exists()
        if replacing:
            if old.exists():  # recover() left it: not a checkpoint, so not charlm's to delete
                raise CheckpointError(f"cannot write checkpoint {path}: {old} is in the way (charlm did not "
                                      f"write it); move it")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if replacing:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (meaning its ``best/``, else its ``last/``)."""
    path = Path(path)
    for candidate in (path, path / "best", path / "last"):
        recover(candidate)
        if (candidate / "manifest.json").is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    raise CheckpointError(f"{path} holds no checkpoint (no manifest.json here, nor in best/ or last/)")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    with_trainer_state: bool = False) -> Checkpoint:
    """Load and verify a checkpoint; ``path`` may be a run directory (its ``best/`` is used)."""
    path = resolve_checkpoint_dir(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest.json ({exc})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: unreadable manifest.json (not a JSON object)")
    for name in FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing; the checkpoint is incomplete")
        if manifest.get(name) != _sha256(file):
            raise CheckpointError(f"{path}: {name} does not match its checksum; the checkpoint is corrupt or was modified")
    try:
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')!r}, "
                                  f"this charlm reads format {FORMAT_VERSION}")
        config = ModelConfig.from_dict(meta.pop("model"))
        vocab = Vocab.load(path / "tokenizer.json")
        state_dict = torch.load(path / "model.pt", map_location=device, weights_only=True)
        # Building the model initialises weights that the checkpoint then replaces: do it on an RNG of its
        # own, so that loading never moves the global one (a resume that loads best/ after restoring the
        # RNG state would otherwise shift every later dropout mask).
        with torch.random.fork_rng(devices=[]):
            model = RNNLM.from_config(config)
        model = model.to(device)
        model.load_state_dict(state_dict)
        trainer_state = (torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
                         if with_trainer_state else None)
    except CheckpointError:
        raise
    except Exception as exc:  # unpickling refused, shapes that do not fit, bad JSON, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load checkpoint ({first})") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer.json has {len(vocab)} symbols, the model {config.vocab_size}")
    model.eval()
    return Checkpoint(model=model, vocab=vocab, config=config, meta=meta,
                      trainer_state=trainer_state, path=path)
