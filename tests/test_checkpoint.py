"""Checkpoints refuse what they must refuse: tampering, code in a pickle, and a full disk."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from charlm import RNNLM, Vocab
from charlm import checkpoint as ck
from charlm.errors import CharlmError, CheckpointError

TEXT = "the time traveller smiled and the machine was gone\n" * 40


@pytest.fixture
def saved(tmp_path):
    vocab = Vocab.from_text(TEXT)
    torch.manual_seed(0)
    model = RNNLM(len(vocab), cell="lstm", hidden_size=8, embedding_dim=4)
    opt = torch.optim.Adam(model.parameters())
    trainer_state = {"optimizer": opt.state_dict(), "step": 3, "torch_rng": torch.get_rng_state()}
    return ck.save_checkpoint(tmp_path / "run" / "last", model, vocab, {"progress": {"step": 3}}, trainer_state)


def _forge_manifest(path: Path, name: str) -> None:
    """Rewrite manifest.json so that it matches ``name`` as it is now: the checksum is no signature."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest[name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


class _WritesAFile:
    """A pickle payload that, if ever unpickled with code allowed, creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["model.pt", "trainer.pt"])
def test_code_in_a_pickle_never_runs_even_with_a_forged_manifest(saved, tmp_path, name):
    marker = tmp_path / "pwned"
    torch.save({"weight": _WritesAFile(marker)}, saved / name)
    _forge_manifest(saved, name)  # the checksum passes: weights_only=True is the only defence left
    with pytest.raises(CheckpointError, match="cannot load checkpoint") as err:
        ck.load_checkpoint(saved, with_trainer_state=True)
    assert not marker.exists()
    assert "\n" not in str(err.value)
    assert "weights" in str(err.value).lower()  # torch's refusal, named


@pytest.mark.parametrize("name", ck.FILES)
def test_every_file_is_checked_against_the_manifest(saved, name):
    data = bytearray((saved / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (saved / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name} does not match its checksum"):
        ck.load_checkpoint(saved, with_trainer_state=True)


def test_a_missing_file_is_named(saved):
    (saved / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        ck.load_checkpoint(saved)


@pytest.mark.parametrize("manifest", ["[]", "3", "null", '"model.pt"', "{nope"])
def test_a_manifest_that_is_not_a_json_object_is_one_line(saved, manifest):
    """#35 (an error class seen while there): a manifest.json holding a list was an AttributeError traceback."""
    (saved / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError, match="unreadable manifest.json"):
        ck.load_checkpoint(saved)


def test_unwritable_place_is_one_line(saved, tmp_path):
    c = ck.load_checkpoint(saved)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CharlmError, match="checkpoint .*a-file/ckpt: cannot write there, .*a-file is a file, not a directory"):
        ck.save_checkpoint(tmp_path / "a-file" / "ckpt", c.model, c.vocab)


def test_full_disk_while_training_is_one_line_and_leaves_nothing_half_written(tmp_path, tiny_disk):
    """A real full disk: the run directory on a 96 KB tmpfs."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    disk = tmp_path / "disk"
    disk.mkdir()
    train = (f"{sys.executable} -m charlm train {tmp_path / 'corpus.txt'} --out {disk / 'run'} --quiet "
             f"--hidden-size 64 --embedding-dim 8 --batch-size 4 --num-steps 10 --max-steps 4 --eval-every 2")
    p = tiny_disk(disk, "96k", f"{train}; echo rc=$?; ls -a {disk / 'run'}")
    assert "rc=1" in p.stdout, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, p.stderr
    assert "No space left on device" in errors[0]
    listing = p.stdout.split()
    assert not [name for name in listing if ".tmp-" in name]  # no half-written checkpoint directory


@pytest.mark.parametrize("rounds, rank", [(5, 0), (4, 3), (1, 0)])
def test_a_mogrifier_checkpoint_round_trip(tmp_path, rounds, rank):
    """Saved and loaded: its rounds and rank in config.json, its weights (the rounds' matrices among them), the
    same logits; and the same file through either implementation."""
    vocab = Vocab.from_text(TEXT)
    torch.manual_seed(0)
    model = RNNLM(len(vocab), cell="mogrifier", hidden_size=8, num_layers=2, embedding_dim=4, mogrify_rounds=rounds,
                  mogrify_rank=rank).eval()
    path = ck.save_checkpoint(tmp_path / "run" / "best", model, vocab, {"progress": {"step": 1}})
    saved = json.loads((path / "config.json").read_text())["model"]
    assert (saved["cell"], saved["mogrify_rounds"], saved["mogrify_rank"]) == ("mogrifier", rounds, rank)
    loaded = ck.load_checkpoint(path)
    assert loaded.model.state_dict().keys() == model.state_dict().keys()
    assert any("weight_q" in k for k in loaded.model.state_dict())
    X = torch.as_tensor(vocab.encode("the machine").astype("int64")).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(X)[0], model(X)[0], atol=0, rtol=0)
        scratch = RNNLM.from_config(type(loaded.config)(**{**loaded.config.to_dict(), "impl": "scratch"})).eval()
        scratch.load_state_dict(loaded.model.state_dict())
        torch.testing.assert_close(scratch(X)[0], model(X)[0], atol=1e-5, rtol=1e-5)
