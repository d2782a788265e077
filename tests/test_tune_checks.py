"""charlm tune's checks and its ownership of what it writes: every check again under the folder's lock (another
process may write the folder between the checks and the lock), temporary files that are recognisably charlm's,
outputs that never land inside a folder charlm owns, the final run of the best configuration (replaced when the
best changed), the device, precision and budgets checked before the first write, study names, TuneConfig's types,
and the command that continues an interrupted search as it is printed.

Trials here are a few steps of a tiny model on a few KB of text (a second or two each).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

optuna = pytest.importorskip("optuna", reason="charlm tune needs the tune extra (pip install 'charlm-rnn[tune]')")

from charlm import tune as tune_mod  # noqa: E402
from charlm.cli import main  # noqa: E402
from charlm.errors import ConfigError, TuneInterrupted  # noqa: E402
from charlm.outputs import marker_kind, write_marker  # noqa: E402
from charlm.tune import TuneConfig, TuneFolder, TuneResult, tune  # noqa: E402

SPACE = ("hidden_size=16:48", "num_layers=1", "embedding_dim=16")
SPACE_ARGS = tuple(a for s in SPACE for a in ("--space", s))


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def search(corpus, out, *extra, trials=1, steps=4):
    """A finished search of ``trials`` tiny trials in ``out``."""
    result = invoke("tune", corpus, "--out", out, "--trials", trials, "--trial-steps", steps, "--pruner", "none",
                    "--quiet", *SPACE_ARGS, *extra)
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, code=1):
    """The output of a refusal: exit ``code``, one line (exit 1), or click's usage and one error line (exit 2)."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and [line.startswith("Error: ") for line in lines].count(True) == 1
    assert code == 2 or len(lines) == 1, result.output
    return result.output


# -- 1. every check again under the lock -----------------------------------------------------------------------
def _between_check_and_lock(monkeypatch, interfere):
    """Run ``interfere(path)`` when the search takes its folder's lock, after its checks (another process acting
    in between)."""
    create, calls = TuneFolder.create, []

    def late(self, *args, **kwargs):
        calls.append(self.path)
        if len(calls) == 1:  # (the other process's own search is not interfered with)
            interfere(self.path)
        return create(self, *args, **kwargs)

    monkeypatch.setattr(TuneFolder, "create", late)


def test_a_run_made_in_the_folder_after_the_checks_is_not_marked_as_a_search(corpus, tmp_path, monkeypatch):
    out = tmp_path / "t"

    def make_run(path):  # what charlm train leaves the moment it has the folder
        path.mkdir()
        write_marker(path, "run")
        (path / "metrics.csv").write_text("step\n")

    _between_check_and_lock(monkeypatch, make_run)
    result = invoke("tune", corpus, "--out", out, "--trials", 1, "--trial-steps", 4, *SPACE_ARGS)
    assert "is not empty and is not a charlm tune folder" in one_line_error(result)
    assert marker_kind(out) == "run"  # never a tune marker over another kind's
    assert sorted(p.name for p in out.iterdir()) == [".charlm", ".charlm.lock", "metrics.csv"]


def test_a_search_made_in_the_folder_after_the_checks_is_not_joined(corpus, tmp_path, monkeypatch):
    out = tmp_path / "t"
    _between_check_and_lock(monkeypatch, lambda path: tune(TuneConfig(
        corpus=str(corpus), out=str(path), trials=1, trial_steps=4, pruner="none", space=SPACE)))
    result = invoke("tune", corpus, "--out", out, "--trials", 2, "--trial-steps", 4, "--pruner", "none", *SPACE_ARGS)
    assert "already holds a search; pass --resume" in one_line_error(result)
    monkeypatch.undo()
    assert len(optuna.load_study(study_name=corpus.stem, storage=tune_mod.open_storage(
        None, out / "study.journal")).trials) == 1  # the other search's, alone


def test_a_search_replaced_after_the_checks_is_checked_again_on_resume(corpus, tmp_path, monkeypatch):
    out = tmp_path / "t"
    search(corpus, out)

    def replace(path):  # another process starts over with other settings
        tune(TuneConfig(corpus=str(corpus), out=str(path), trials=1, trial_steps=6, pruner="none", space=SPACE),
             overwrite=True)

    _between_check_and_lock(monkeypatch, replace)
    result = invoke("tune", corpus, "--out", out, "--trials", 2, "--trial-steps", 4, "--resume")
    assert "was started with --trial-steps 6, not 4" in one_line_error(result), repr(result.exception)


# -- 2. temporary files: charlm's only ---------------------------------------------------------------------------
def test_a_users_file_named_like_a_temporary_file_is_never_deleted(corpus, tmp_path):
    out = tmp_path / "race1"
    search(corpus, out)
    for name in (".notes.tmp", ".trials.csv.tmp"):
        (out / name).write_text("mine")
        before = tree(out)
        result = invoke("tune", corpus, "--out", out, "--trials", 1, "--trial-steps", 4, "--overwrite", *SPACE_ARGS)
        assert f"also holds {name}, which charlm did not write" in one_line_error(result)
        assert tree(out) == before
        (out / name).unlink()
    # what a kill leaves in charlm's own temporary folder goes with the search (and a resume tidies it)
    assert sorted(p.name for p in (out / ".charlm-tune-tmp").iterdir()) == [".charlm"]
    (out / ".charlm-tune-tmp" / "trials.csv.tmp-0123abcd").write_text("half")
    search(corpus, out, "--resume", trials=1)
    assert sorted(p.name for p in (out / ".charlm-tune-tmp").iterdir()) == [".charlm"]
    (out / ".charlm-tune-tmp" / "best.json.tmp-0123abcd").write_text("half")
    search(corpus, out, "--overwrite")
    (out / ".charlm-tune-tmp" / "notes.txt").write_text("mine")  # a user's file in there is not charlm's either
    result = invoke("tune", corpus, "--out", out, "--trials", 1, "--trial-steps", 4, "--overwrite", *SPACE_ARGS)
    assert ".charlm-tune-tmp/notes.txt, which charlm did not write" in one_line_error(result)


# -- 3. outputs inside folders charlm owns -------------------------------------------------------------------------
def test_outputs_inside_owned_folders_are_refused_before_anything_is_written(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = tmp_path / "done"
    search(corpus, done)
    run = tmp_path / "run"
    assert invoke("train", corpus, "--out", run, "--max-steps", 2, "--hidden-size", 8, "--num-layers", 1,
                  "--embedding-dim", 4, "--batch-size", 2, "--num-steps", 8, "--quiet").exit_code == 0
    cases = [
        (("--out", "new", "--tensorboard", "new"), "--tensorboard new"),
        (("--out", "new", "--tensorboard", "new/tb"), "--tensorboard new/tb"),
        (("--out", "new", "--tensorboard", ""), "--tensorboard"),
        (("--out", "new", "--tensorboard", done), "lies inside"),
        (("--out", "new", "--tensorboard", run / "tb"), "lies inside"),
        (("--out", "new", "--storage", "sqlite:///new/x.db"), "--storage"),
        (("--out", "new", "--storage", f"sqlite:///{done}/x.db"), "lies inside"),
        (("--out", "new", "--storage", f"sqlite:///{run}/last/x.db"), "lies inside"),
        (("--out", run / "sub"), "lies inside"),
        (("--out", done / "final" / "x"), "lies inside"),
    ]
    before = tree(tmp_path)
    for args, message in cases:
        result = invoke("tune", corpus, "--trials", 1, "--trial-steps", 4, *SPACE_ARGS, *args)
        assert message in one_line_error(result, result.exit_code if result.exit_code == 2 else 1), args
        assert tree(tmp_path) == before, args
    # and a search with its events and database beside it, not inside, is resumed and replaced as its own
    search(corpus, "new", "--tensorboard", "tb", "--storage", "sqlite:///new.db", "--study", "s")
    search(corpus, "new", "--tensorboard", "tb", "--storage", "sqlite:///new.db", "--study", "s", "--resume",
           trials=2)


# -- 6. the final run is the best configuration's ---------------------------------------------------------------------
def test_the_final_run_follows_a_new_best_and_resumes_only_its_own(corpus, tmp_path):
    from optuna.distributions import IntDistribution
    from optuna.trial import create_trial

    out = tmp_path / "tf"
    search(corpus, out, "--final-time", 1)
    first = json.loads((out / "final" / "last" / "config.json").read_text())["train"]
    # a better trial of another configuration (as a resumed search finds one)
    study = optuna.load_study(study_name=corpus.stem, storage=tune_mod.open_storage(None, out / "study.journal"))
    train = {**study.trials[0].user_attrs["train"], "hidden_size": 17 if first["hidden_size"] != 17 else 18}
    study.add_trial(create_trial(params={"hidden_size": train["hidden_size"]}, value=0.001, user_attrs={
        "train": train, "run": str(out / "trials" / "0001"), "host": "here"},
        distributions={"hidden_size": IntDistribution(16, 48, log=True)}))
    del study
    result = invoke("tune", corpus, "--out", out, "--trials", 2, "--final-time", 1, "--resume")
    assert result.exit_code == 0, result.output
    final = json.loads((out / "final" / "last" / "config.json").read_text())
    assert final["train"]["hidden_size"] == train["hidden_size"]
    assert f"--hidden-size {train['hidden_size']}" in (out / "final-command.txt").read_text()
    assert "Final run" in result.output
    # the same best again: final/ goes on (resumed), not started over
    rows = (out / "final" / "metrics.csv").read_text()
    result = invoke("tune", corpus, "--out", out, "--trials", 2, "--final-time", 1, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming the final run of the best configuration (trial 1)" in result.output
    assert (out / "final" / "metrics.csv").read_text().startswith(rows)


def test_final_command_is_written_only_after_the_final_run(corpus, tmp_path, monkeypatch):
    from charlm import training
    from charlm.errors import TrainingInterrupted

    out = tmp_path / "tf"
    real = training.train

    def interrupted(cfg, **kwargs):
        if Path(cfg.out).name == "final":
            raise TrainingInterrupted("SIGINT: stopped at step 0", None)
        return real(cfg, **kwargs)

    monkeypatch.setattr(training, "train", interrupted)
    result = invoke("tune", corpus, "--out", out, "--trials", 1, "--trial-steps", 4, "--final-time", 1, "--quiet",
                    *SPACE_ARGS)
    assert result.exit_code == 130, result.output
    assert not (out / "final-command.txt").exists()


# -- 7. device, precision and budgets before the first write ----------------------------------------------------------
def test_device_precision_and_budgets_are_checked_before_anything_is_written(corpus, tmp_path):
    import torch

    cases = [(("--device", "bogus"), 1, "unknown device 'bogus'"),
             (("--precision", "fp16", "--device", "cpu"), 1, "--precision fp16 is not supported on CPUs"),
             (("--time-budget", 0.001), 2, "--time-budget 0.001"),
             (("--time-budget", 5, "--final-time", 4.99), 2, "leaves 0.01s to search"),
             (("--time-budget", 5), 1, "gives each trial a tenth of it"),
             (("--trial-time", 0.5), 2, "--trial-time must be at least 1s")]
    if not torch.cuda.is_available():
        cases.append((("--device", "cuda"), 1, "this torch sees no CUDA GPU"))
    for args, code, message in cases:
        out = tmp_path / "tq"
        result = invoke("tune", corpus, "--out", out, "--trials", 1, *SPACE_ARGS, *args)
        assert message in one_line_error(result, code), (args, result.output)
        assert not out.exists(), args
    # nothing was left behind: the same folder takes the search without the option
    search(corpus, tmp_path / "tq")
    # a resumed study keeps its trial budget: a time budget shorter than its trials is refused, naming it
    timed = tmp_path / "timed"
    assert invoke("tune", corpus, "--out", timed, "--trials", 1, "--trial-time", 2, "--pruner", "none", "--quiet",
                  *SPACE_ARGS).exit_code == 0
    before = tree(timed)
    result = invoke("tune", corpus, "--out", timed, "--trials", 2, "--time-budget", 1.5, "--resume")
    assert "shorter than one trial of the study 'tiny' (its --trial-time, 2s): give more --time-budget" in \
        one_line_error(result)
    assert tree(timed) == before


def test_a_trial_budget_by_time_hint_names_trial_time():
    hint = tune_mod.no_trial_hint("--time-budget spent", {"trial_steps": None, "trial_time": 3.0}, False, "t.csv")
    assert "--trial-steps" not in hint and "--trial-time" in hint
    hint = tune_mod.no_trial_hint("--time-budget spent", {"trial_steps": 50, "trial_time": None}, False, "t.csv")
    assert "fewer --trial-steps" in hint
    hint = tune_mod.no_trial_hint("--time-budget spent", {"trial_steps": None, "trial_time": 3.0}, True, "t.csv")
    assert "--trial-time" not in hint  # a resumed study's trial budget is the study's


# -- 8. study names ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs", "", ".", "a/b", "x" * 101, "a b", "-x"])
def test_study_names_are_checked(corpus, tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    result = invoke("tune", corpus, "--out", "t", "--trials", 1, "--trial-steps", 4, "--study", name,
                    "--tensorboard", "tbz", *SPACE_ARGS)
    assert "--study must be" in one_line_error(result, 2)
    assert tree(tmp_path) == before


# -- 9. TuneConfig's types -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("trials", "3"), ("trials", 2.5), ("trials", True), ("trials", 0), ("trial_steps", "10"), ("trial_steps", 1.5),
    ("min_count", "2"), ("min_count", 1.5), ("val_fraction", "0.1"), ("val_fraction", True), ("device", 5),
    ("device", ""), ("study", 3), ("storage", 5), ("storage", ""), ("out", 5), ("out", ""), ("space", "lr=1e-3"),
    ("space", ("lr=1e-3", 5)), ("tensorboard", 5), ("pruner", 5), ("preprocess", ["raw"]), ("precision", None),
    ("time_budget", "60"), ("final_time", True), ("corpus", 5), ("seed", "1"), ("storage_from", "--x"),
])
def test_tune_config_types_are_strict(field, value):
    kwargs = {"corpus": "c.txt", "trials": 1, field: value}
    with pytest.raises(ConfigError) as err:
        TuneConfig(**kwargs)
    assert len(str(err.value).splitlines()) == 1


def test_tune_config_takes_a_list_of_space_items_and_paths():
    cfg = TuneConfig(corpus=Path("c.txt"), out=Path("o"), trials=1, space=["lr=0.001"], tensorboard=Path("tb"))
    assert cfg.space == ("lr=0.001",)


# -- 10. the command that continues an interrupted search ------------------------------------------------------------
def _interrupt_at_once(monkeypatch):
    def interrupted(cfg, resume=False, **kwargs):
        raise TuneInterrupted("SIGINT", TuneResult(out=Path(cfg.out), study="s", storage="x"))

    monkeypatch.setattr(tune_mod, "tune", interrupted)


def _resume_command(output: str) -> list[str]:
    line = next(line for line in output.splitlines() if "Resume with: " in line)
    return shlex.split(line.split("Resume with: ", 1)[1].split(" (", 1)[0])


def test_the_resume_command_works_as_printed_with_the_storage_in_the_environment(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"CHARLM_TUNE_STORAGE": f"sqlite:///{tmp_path / 'db.sqlite'}"}
    args = ("tune", corpus, "--out", "t", "--trials", 1, "--trial-steps", 4, "--pruner", "none", "--study", "s",
            "--quiet", *SPACE_ARGS)
    assert invoke(*args, env=env).exit_code == 0
    with monkeypatch.context() as m:
        _interrupt_at_once(m)
        result = invoke(*args, "--resume", env=env)
    assert result.exit_code == 130
    assert "--storage" not in result.output and "CHARLM_TUNE_STORAGE" in result.output
    words = _resume_command(result.output)
    assert words[:2] == ["charlm", "tune"] and "--study=s" in words
    again = invoke(*words[1:], env=env)  # as printed, with the environment as it was
    assert again.exit_code == 0, again.output
    # --overwrite names where the storage came from
    result = invoke(*args, "--overwrite", env=env)
    assert "--overwrite with CHARLM_TUNE_STORAGE" in one_line_error(result)


def test_the_resume_command_repeats_a_storage_url_but_never_its_password(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _interrupt_at_once(monkeypatch)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    result = invoke("tune", corpus, "--out", "t", "--trials", 3, "--storage", url, "--study", "s")
    assert result.exit_code == 130
    words = _resume_command(result.output)
    assert f"--storage={url}" in words and "--storage=URL" not in words
    result = invoke("tune", corpus, "--out", "t", "--trials", 3, "--storage",
                    "postgresql+psycopg://charlm:s3cret@127.0.0.1:5432/db")
    assert result.exit_code == 130 and "s3cret" not in result.output and "URL" not in _resume_command(result.output)
    assert "password" in result.output


def _bare_study(storage, name="shared", shared=True):
    """A _Study reading ``name`` in ``storage`` (a database, or this folder's journal), without a worker."""
    from types import SimpleNamespace

    store = tune_mod._Study.__new__(tune_mod._Study)
    store.cfg = SimpleNamespace(storage="db" if shared else None, storage_from="--storage")
    store.folder = SimpleNamespace(journal=Path("tu/study.journal"))
    store.name, store.storage = name, storage
    return store


def test_a_study_another_worker_made_a_moment_ago_is_joined_once_it_is_marked():
    """Optuna makes a study, then charlm marks it with its settings: a second worker that reads the study between
    the two waits for the mark (two workers starting together on one database refused each other)."""
    import threading

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="shared")
    settings = {"format": 1, "space": {}}
    marker = threading.Timer(1.0, lambda: study.set_user_attr(tune_mod.SETTINGS_KEY, settings))
    marker.start()
    try:
        assert _bare_study(storage).stored_settings() == settings
    finally:
        marker.cancel()


@pytest.mark.parametrize("with_a_trial", [False, True])
def test_a_study_charlm_did_not_make_is_refused(monkeypatch, with_a_trial):
    monkeypatch.setattr(tune_mod, "MARK_WAIT_S", 0.5)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="shared")
    if with_a_trial:  # (a study with trials is not a moment old: refused at once)
        study.enqueue_trial({"x": 1.0})
        study.optimize(lambda t: t.suggest_float("x", 0, 2), n_trials=1)
    with pytest.raises(tune_mod.TuneError, match="was not made by charlm tune"):
        _bare_study(storage).stored_settings()


def test_an_unmarked_study_in_the_folders_own_journal_is_taken_as_new_and_a_foreign_one_named_by_its_file():
    """Only this process writes its folder's journal: an unmarked study without trials there is a start stopped
    between making the study and marking it (no waiting for a mark that cannot come); one with trials is
    refused, naming the journal (no --storage was given)."""
    import time

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="shared")
    t0 = time.monotonic()
    assert _bare_study(storage, shared=False).stored_settings() is None
    assert time.monotonic() - t0 < tune_mod.MARK_WAIT_S / 2
    study.optimize(lambda t: t.suggest_float("x", 0, 2), n_trials=1)
    with pytest.raises(tune_mod.TuneError, match=r"in tu/study.journal was not made by charlm tune"):
        _bare_study(storage, shared=False).stored_settings()
