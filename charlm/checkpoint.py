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

Saving writes a sibling temporary directory (``.NAME.tmp-XXXX``) and renames it into place. Replacing
an existing checkpoint takes two renames: the old one, marked inside as the backup of ``NAME``
(``.charlm-old``), to ``.NAME.old-XXXX``, then the new one to ``NAME``; the backup is then deleted. A
kill between the renames leaves the marked backup, which :func:`load_checkpoint` reads in place and
the next save of ``NAME`` puts back or deletes. So at any instant one complete checkpoint can be
loaded, loading never moves or deletes anything, and a folder charlm did not mark (a user's
``model.old`` beside ``model``) is never touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from charlm.config import ModelConfig, TrainConfig
from charlm.errors import CheckpointError, os_error_line
from charlm.models import RNNLM
from charlm.outputs import (FILE, OLD_MARK, TMP_MARK, check_folder, check_not_cwd, check_not_inside_owned, check_parent,
                            default_folder_mode,
                            entry_kind, folder_mode, is_manifest, mark_of, move_into_empty, new_folders, resolve_path,
                            temp_prefix, write_mark)
from charlm.vocab import Vocab

FORMAT_VERSION = 1
FILES = ("model.pt", "trainer.pt", "config.json", "tokenizer.json")


class RunCorpus:
    """What a saved model knows of the corpus its run trained on, from ``corpus_info`` (a dict): the
    places that read a held-out text back (:func:`charlm.evaluation.held_out_ids`) need only these."""

    corpus_info: dict
    meta: dict

    @property
    def run_folder(self) -> Path | None:
        """The run directory the model was saved in, where it is known (a run's ``best/`` or ``last/``)."""
        return None

    @property
    def corpus_candidates(self) -> list[Path]:
        """Where the run's corpus may be: its absolute path, then the file at its path from the run folder (a
        project moved or copied whole, or seen through another mount); :func:`charlm.evaluation.held_out_ids`
        takes the first whose contents are the run's (its sha256)."""
        info = self.corpus_info
        if not info.get("path"):
            return []
        candidates = [Path(info["path"])]
        if info.get("path_from_run") and self.run_folder is not None:
            relative = (self.run_folder / info["path_from_run"]).resolve()
            if relative != candidates[0]:
                candidates.append(relative)
        return candidates

    @property
    def corpus_path(self) -> Path | None:
        """The run's corpus: the candidate found to hold its text (once read), else the first that exists, else
        the path as stored; None when the run names none."""
        found = getattr(self, "_corpus_found", None)
        candidates = self.corpus_candidates
        if found is not None or not candidates:
            return found
        return next((c for c in candidates if c.exists()), candidates[0])

    @property
    def val_fraction(self) -> float:
        return self.corpus_info.get("val_fraction", TrainConfig.val_fraction)

    @property
    def min_count(self) -> int:
        return self.corpus_info.get("min_count", TrainConfig.min_count)

    @property
    def lineage(self) -> dict | None:
        """Where a fine-tuned model started (``charlm train --init-from``; see :mod:`charlm.finetune`), else None."""
        lineage = self.meta.get("lineage")
        return lineage if isinstance(lineage, dict) else None


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
    def sizing(self) -> str | None:
        """What the size rule chose for the run and why (``TrainConfig.sized``), or None (all given, or older)."""
        sizing = self.meta.get("sizing")
        return sizing if isinstance(sizing, str) else None

    @property
    def run_folder(self) -> Path | None:
        if self.path is None:
            return None
        name = self.path.name
        return self.path.parent if name in ("best", "last") or name.startswith((".best.old-", ".last.old-")) else None

    @property
    def preprocess(self) -> str:
        """How the corpus was normalised; apply the same to a prompt or an evaluation file."""
        return self.corpus_info.get("preprocess", TrainConfig.preprocess)

    @property
    def progress(self) -> dict:
        """``step``, ``epoch``, ``best_val_loss`` (the best periodic evaluation), ``held_out`` (in ``best/``:
        the whole held-out text's figure), ... at the time of saving."""
        return dict(self.meta.get("progress", {}))

    def held_out_figure(self) -> tuple[float | None, int | None]:
        """The held-out loss and how many characters it covers: the whole held-out text's when the run
        measured it, else the best periodic evaluation's (over the tail's first ``eval_chars``)."""
        held_out = self.progress.get("held_out")
        if isinstance(held_out, dict) and held_out.get("loss") is not None:
            return held_out["loss"], held_out.get("chars")
        return self.progress.get("best_val_loss"), self.corpus_info.get("eval_chars")


def corpus_paths(corpus: str | os.PathLike, run: str | os.PathLike) -> dict:
    """The corpus's place as a run stores it: ``path``, absolute (``charlm eval RUN`` works from any folder),
    and ``path_from_run``, relative to the run folder (a project moved whole, runs and corpora together)."""
    absolute = Path(corpus).resolve()
    return {"path": str(absolute), "path_from_run": os.path.relpath(absolute, Path(run).resolve())}


def held_out_entry(result) -> dict:
    """The whole held-out figure of a checkpoint's weights, as its progress keeps it (``held_out``)."""
    return {"loss": result.loss, "chars": result.tokens}


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




def checkpoint_files_only(path: Path) -> bool:
    """Whether ``path`` is a real folder holding only the files a checkpoint is made of (a manifest not
    required: a deletion that a kill interrupted may have taken it first)."""
    try:
        return path.is_dir() and not path.is_symlink() and all(
            entry_kind("checkpoint", p.name) == FILE and p.is_file() and not p.is_symlink() for p in path.iterdir())
    except OSError:
        return False


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a complete checkpoint folder charlm wrote, holding nothing else."""
    return checkpoint_files_only(path) and is_manifest(path / "manifest.json")


def _backups(path: Path) -> list[Path]:
    """The checkpoints a replacement of ``path`` moved aside (``.NAME.old-XXXX``, each marked as the backup of
    ``NAME`` by charlm), newest first. A folder of that shape without the mark is the user's, never listed."""
    prefix = temp_prefix(path.name) + "old-"
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    found = [c for c in candidates if mark_of(c, OLD_MARK) == path.name and checkpoint_files_only(c)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def backup_of(path: Path) -> Path:
    """The checkpoint ``path`` stands for: itself, or for a backup charlm moved aside (``.NAME.old-XXXX``, read
    while a replacement of ``NAME`` was cut short), ``NAME``."""
    of = mark_of(path, OLD_MARK)
    return path.with_name(of) if of and path.name.startswith(temp_prefix(of) + "old-") else path


def recover(path: str | os.PathLike) -> None:
    """Finish a replacement of the checkpoint ``path`` that a kill interrupted (a write: only writers call
    it): the backup put back where ``path`` is missing, deleted where ``path`` is there. Only folders charlm
    marked as such a backup are moved or deleted: a user's ``model.old`` beside ``model`` is never touched."""
    path = Path(path)
    if not path.name:
        return
    backups = _backups(path)
    if not path.exists() and not path.is_symlink():
        complete = [b for b in backups if (b / "manifest.json").is_file()]
        if complete:
            os.replace(complete[0], path)
            (path / OLD_MARK).unlink(missing_ok=True)
            backups = [b for b in backups if b != complete[0]]
    if _is_checkpoint(path):
        for backup in backups:
            shutil.rmtree(backup, ignore_errors=True)


def save_checkpoint(path: str | os.PathLike, model: RNNLM, vocab: Vocab, meta: dict | None = None,
                    trainer_state: dict | None = None) -> Path:
    """Write a complete checkpoint to ``path`` atomically (see the module docstring) and return where.

    A failure to write (an unwritable place, a full disk) is a one-line ``CheckpointError``, and
    whatever checkpoint was at ``path`` before is still there. ``path`` must be new, an empty folder
    or a checkpoint: a folder or file charlm did not write is refused (:class:`~charlm.outputs.NotOwnedError`)
    and left as it is. The path is resolved first (:func:`~charlm.outputs.resolve_path`): ``missing/../mine``
    is ``mine``.
    """
    path = resolve_path(path)
    check_parent(path, option="checkpoint")
    check_not_inside_owned(path, "checkpoint", option="checkpoint")
    check_folder(path, "checkpoint", option="checkpoint")
    check_not_cwd(path, option="checkpoint")  # (it is replaced by a rename: the caller's folder would vanish)
    if not path.name:
        raise CheckpointError(f"cannot write checkpoint {path}: name a folder for it")
    try:
        return _save(path, model, vocab, meta, trainer_state)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {os_error_line(exc)}") from None


def _save(path: Path, model: RNNLM, vocab: Vocab, meta: dict | None, trainer_state: dict | None) -> Path:
    with new_folders(path.parent):
        recover(path)
        _write(path, model, vocab, meta, trainer_state)
    return path


def _write(path: Path, model: RNNLM, vocab: Vocab, meta: dict | None, trainer_state: dict | None) -> None:
    tmp = _new_temporary(path)
    try:
        mode = folder_mode(path)
        os.chmod(tmp, default_folder_mode() if mode is None else mode)  # (mkdtemp makes it 0700)
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
        _write_manifest(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _new_temporary(path: Path) -> Path:
    """A fresh folder beside ``path`` (``.NAME.tmp-XXXX``) to write its next version in, marked as charlm's (a
    kill leaves it to the next writer of the run to delete, and only because of that mark)."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name) + "tmp-", dir=path.parent))
    write_mark(tmp, TMP_MARK, path.name)
    return tmp


def _write_manifest(folder: Path) -> None:
    """``manifest.json`` for the files of the checkpoint folder being written, then everything to disk."""
    manifest = {name: _sha256(folder / name) for name in FILES}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for name in (*FILES, "manifest.json"):
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the complete checkpoint ``tmp`` to ``path``. An earlier checkpoint there is first marked as the
    backup of ``path`` and moved aside to ``.NAME.old-XXXX``, then deleted: a kill at any moment leaves either
    ``path`` or that backup, which the next write (:func:`recover`) finishes, and a reader falls back to."""
    (tmp / TMP_MARK).unlink()  # finished: no longer a temporary (a kill just before leaves an unmarked leftover)
    if path.is_dir() and not any(path.iterdir()):  # an empty folder (the user's, perhaps): filled, kept itself
        move_into_empty(tmp, path, "checkpoint", last="manifest.json")
        _fsync_dir(path)
    elif path.exists():
        write_mark(path, OLD_MARK, path.name)
        old = path.with_name(temp_prefix(path.name) + f"old-{secrets.token_hex(4)}")
        os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def update_progress(path: str | os.PathLike, **progress) -> None:
    """Add ``progress`` fields to the saved checkpoint ``path`` (its weights untouched), atomically as a save:
    a copy whose large files are hard links, its config and manifest rewritten, swapped in."""
    path = Path(path)
    meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    meta["progress"] = {**meta.get("progress", {}), **progress}
    tmp = _new_temporary(path)
    try:
        os.chmod(tmp, folder_mode(path) or default_folder_mode())
        for name in FILES:
            if name == "config.json":
                continue
            try:
                os.link(path / name, tmp / name)
            except OSError:
                shutil.copyfile(path / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _write_manifest(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (meaning its ``best/``, else its ``last/``). Reading only:
    where a replacement was cut short and the checkpoint is missing, its marked backup is read in place."""
    path = Path(path)
    for candidate in (path, path / "best", path / "last"):
        if (candidate / "manifest.json").is_file():
            return candidate
        if not candidate.exists() and candidate.name:
            complete = [b for b in _backups(candidate) if (b / "manifest.json").is_file()]
            if complete:
                return complete[0]
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    raise CheckpointError(f"{path} holds no checkpoint (no manifest.json here, nor in best/ or last/)")


READ_ATTEMPTS = 5  # a load that a save swapped the checkpoint under is read again, at most this many times in all


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    with_trainer_state: bool = False) -> Checkpoint:
    """Load and verify a checkpoint; ``path`` may be a run directory (its ``best/`` is used). A load that mixed
    files of two versions (a save replaced the folder while it read) is read again: only a checkpoint that stays
    wrong when nothing replaces it is called corrupt."""
    for attempt in range(READ_ATTEMPTS):
        folder = resolve_checkpoint_dir(path)
        identity = _identity(folder)
        try:
            return _load(folder, device, with_trainer_state)
        except CheckpointError:
            if attempt + 1 == READ_ATTEMPTS or _identity(folder) == identity:
                raise


def _identity(folder: Path) -> tuple | None:
    """What a replacement changes: the folder's inode (a save renames a new folder into place), or None if gone."""
    try:
        st = folder.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _load(path: Path, device, with_trainer_state: bool) -> Checkpoint:
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
