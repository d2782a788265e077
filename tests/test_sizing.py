"""The size rule (TrainConfig.sized; explanation/defaults, "Sizes from the text and the budget"): what it
picks for texts of several sizes and budgets, that every option the user gives wins, that a run says what
was chosen (its first lines, charlm info), saves it, and resumes with it."""

import dataclasses
import json

import pytest
from click.testing import CliRunner

from charlm.cli import main
from charlm.config import (FEW_READS, MANY_READS, REGULARISERS, SIZE_FEW_READS, SIZE_MID_READS, SIZE_SMALL_TEXT,
                           SIZED_FIELDS, SIZING_CHARS_PER_S, SMALL_TEXT_CHARS, TrainConfig)
from conftest import rewrite_config


def sizes(cfg: TrainConfig) -> dict:
    return {name: getattr(cfg, name) for name in SIZED_FIELDS}


@pytest.mark.parametrize("chars, options, expected", [
    # the measured cases (explanation/defaults): the default budget is 20 epochs or 600 s
    (30_000, {}, SIZE_MID_READS),  # the small text at the default budget: its 20 epochs
    (30_000, {"epochs": 10**6}, SIZE_SMALL_TEXT),  # ... at 10 minutes: 200 reads
    (30_000, {"epochs": 10**6, "time_limit": 120.0}, SIZE_SMALL_TEXT),  # ... at 2 minutes: 40 reads
    (163_000, {}, SIZE_MID_READS),  # The Time Machine at the default budget (the quickstart): 20 epochs
    (163_000, {"epochs": 10**6}, SIZE_MID_READS),  # ... at 10 minutes: 37 reads, of a text not small
    (SMALL_TEXT_CHARS - 1, {"epochs": 10**6}, SIZE_SMALL_TEXT),
    (SMALL_TEXT_CHARS, {"epochs": 10**6}, SIZE_MID_READS),
    (1_000_000, {}, SIZE_MID_READS),  # Tiny Shakespeare at 10 minutes: 6 reads
    (1_000_000, {"time_limit": 140.0}, SIZE_FEW_READS),  # ... at 140 s: 1.4 reads
    (18_000_000, {}, SIZE_FEW_READS),  # 20 MB at 10 minutes: a third of a read
    # the other budgets
    (1_000_000, {"epochs": 1}, SIZE_FEW_READS),  # one epoch asked for
    (1_000_000, {"max_steps": 10}, SIZE_FEW_READS),  # 10 x 32 x 64 characters
    (18_000_000, {"time_limit": None, "epochs": 2}, SIZE_MID_READS),  # no time limit: the epochs decide
    (1_000, {"time_limit": None, "epochs": 31}, SIZE_SMALL_TEXT),
])
def test_the_rule_picks_by_the_text_and_the_budget(chars, options, expected):
    cfg, why = TrainConfig(corpus="x", **options).sized(chars)
    assert sizes(cfg) == expected and f"{chars:,}" in why


def test_reads_is_the_least_of_the_budgets():
    cfg = TrainConfig(corpus="x", epochs=7, max_steps=None, time_limit=None)
    assert cfg.reads(10_000) == 7
    assert TrainConfig(corpus="x", epochs=7, max_steps=10, time_limit=None).reads(10**6) == 10 * 32 * 64 / 10**6
    assert TrainConfig(corpus="x", epochs=10**6, time_limit=30.0).reads(10**6) == 30 * SIZING_CHARS_PER_S / 10**6
    # the boundaries: FEW_READS and MANY_READS themselves get the middle model
    for chars in (50_000, 2_000_000):
        for reads, expected in ((0.99 * FEW_READS, SIZE_FEW_READS), (FEW_READS, SIZE_MID_READS),
                                (MANY_READS, SIZE_MID_READS),
                                (1.01 * MANY_READS, SIZE_SMALL_TEXT if chars < SMALL_TEXT_CHARS else SIZE_MID_READS)):
            cfg = TrainConfig(corpus="x", epochs=10**6, time_limit=reads * chars / SIZING_CHARS_PER_S)
            assert sizes(cfg.sized(chars)[0]) == expected, (chars, reads)


@pytest.mark.parametrize("chars", [30_000, 163_000, 18_000_000])
def test_every_option_given_wins(chars):
    given = {"hidden_size": 48, "weight_drop": 0.4}
    cfg, why = TrainConfig(corpus="x", **given).sized(chars)
    rule = TrainConfig(corpus="x").sized(chars)[0]
    assert cfg.hidden_size == 48 and cfg.weight_drop == 0.4
    assert cfg.num_layers == rule.num_layers  # the others: the rule's
    assert all(getattr(cfg, n) == getattr(rule, n) for n in ("dropout_input", "dropout_hidden", "dropout_output"))
    assert "weight-drop" not in why and "48" not in why  # what the user set is not said to be chosen
    assert why.startswith(f"num-layers {rule.num_layers}, dropout-input")
    everything = {name: SIZE_MID_READS[name] + (1 if name in ("hidden_size", "num_layers") else 0.01)
                  for name in SIZED_FIELDS}
    cfg, why = TrainConfig(corpus="x", **everything).sized(chars)
    assert why is None and sizes(cfg) == everything


def test_the_model_config_of_an_unsized_config_is_the_rules():
    cfg = TrainConfig(corpus="x")
    for chars in (30_000, 163_000, 18_000_000):
        m, sized = cfg.model_config(40, chars), cfg.sized(chars)[0]
        assert (m.hidden_size, m.num_layers) == (sized.hidden_size, sized.num_layers)
        assert all(getattr(m, n) == getattr(sized, n) for n in REGULARISERS)


def test_a_run_says_and_saves_what_was_chosen_and_resumes_with_it(write_corpus, tmp_path):
    text = write_corpus(3)  # 508 training characters, read 40 times: the small text's model
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", str(text), "--out", str(out), "--epochs", "40", "--time-limit", "0",
                                  "--eval-every", "100", "--batch-size", "4", "--num-steps", "16", "--embedding-dim",
                                  "8", "--lr-schedule", "plateau", "--patience", "0"])  # (no plan: a resume goes on)
    assert r.exit_code == 0, r.output
    said = r.output.index("sized for the text and the budget: 1 x 128, weight-drop 0.25")
    assert said < r.output.index("training 74,218-parameter LSTM")  # the run's first line
    assert "the 508 training characters about 40 times, over 30, and they are under 75,000" in r.output
    saved = json.loads((out / "best" / "config.json").read_text())
    assert {k: saved["train"][k] for k in SIZED_FIELDS} == SIZE_SMALL_TEXT
    assert saved["model"]["hidden_size"] == 128 and saved["model"]["num_layers"] == 1
    info = CliRunner().invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and "sized:        1 x 128" in info.output, info.output
    # a resume takes the run's sizes, whatever the rule would pick for a budget now (here a few reads)
    r = CliRunner().invoke(main, ["train", str(text), "--out", str(out), "--resume", "--epochs", "42"])
    assert r.exit_code == 0, r.output
    resumed = json.loads((out / "last" / "config.json").read_text())
    assert resumed["progress"]["step"] == 294 and resumed["model"]["hidden_size"] == 128  # it trained on, sized so
    r = CliRunner().invoke(main, ["train", str(text), "--out", str(out), "--resume", "--hidden-size", "64"])
    assert r.exit_code == 1 and "hidden-size: 128 -> 64" in r.output


def test_the_api_resumes_a_sized_run_with_nothing_given(write_corpus, tmp_path):
    from charlm.training import train

    text = write_corpus(20)
    cfg = TrainConfig(corpus=str(text), out=str(tmp_path / "run"), max_steps=3, eval_every=3, batch_size=4,
                      num_steps=16, embedding_dim=8, time_limit=None, lr_schedule="plateau", epochs=100)
    assert train(cfg).steps == 3
    assert train(dataclasses.replace(cfg, max_steps=5), resume=True).steps == 5  # (sizes None: the run's)


def test_a_budget_reading_the_text_under_twice_gets_the_few_reads_model(write_corpus, tmp_path):
    text = write_corpus(40)  # 2 steps of 4 x 16 characters read a fiftieth of it
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", str(text), "--out", str(out), "--max-steps", "2", "--eval-every", "2",
                                  "--batch-size", "4", "--num-steps", "16", "--embedding-dim", "8",
                                  "--hidden-size", "16", "--quiet"])
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "best" / "config.json").read_text())
    assert saved["train"]["hidden_size"] == 16  # given
    assert saved["train"]["num_layers"] == SIZE_FEW_READS["num_layers"]
    assert all(saved["train"][name] == 0.0 for name in REGULARISERS)
    assert "no regularisers" in saved["sizing"] and "under 2" in saved["sizing"]


def test_the_help_states_the_rules_figures():
    text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert f"--time-limit at {SIZING_CHARS_PER_S:,} characters a second" in text
    few, mid, small = SIZE_FEW_READS, SIZE_MID_READS, SIZE_SMALL_TEXT
    assert f"read under {FEW_READS:g} times: {few['num_layers']} x {few['hidden_size']}, no regularisers" in text
    assert (f"a text under {SMALL_TEXT_CHARS:,} characters read over {MANY_READS:g} times: {small['num_layers']} x "
            f"{small['hidden_size']}, regularised as below") in text
    regs = " ".join(f"--{n.replace('_', '-')} {mid[n]:g}" for n in REGULARISERS)
    assert f"otherwise: {mid['num_layers']} x {mid['hidden_size']}, {regs}" in text
    assert all(small[n] == mid[n] for n in REGULARISERS) and not any(few[n] for n in REGULARISERS)


def test_the_reason_names_only_what_the_rule_chose():
    _, why = TrainConfig(corpus="x", epochs=1, weight_drop=0.5).sized(10**6)  # few reads, a regulariser given
    assert why.startswith("2 x 192, dropout-input 0, dropout-hidden 0, dropout-output 0 (") and "about once" in why
    for budget, words in (({"time_limit": 1.9996}, "just under 2 times, under 2"),
                          ({"epochs": 40, "time_limit": 3.00001}, "just over 30 times, over 30"),
                          ({"epochs": 30, "time_limit": None}, "about 30 times, from 2 to 30"),
                          ({"time_limit": 0.001}, "less than a hundredth of once")):
        chars = 10_000_000 if "0.001" in str(budget) else 10_000 if "1.9996" in str(budget) else 1_000
        assert words in TrainConfig(corpus="x", **budget).sized(chars)[1], budget
    _, why = TrainConfig(corpus="x", epochs=1).sized(10**6)
    assert why.startswith("2 x 192, no regularisers (")


def test_a_budget_past_what_a_float_holds_is_many_reads_not_a_traceback():
    cfg = TrainConfig(corpus="x", epochs=10**400, time_limit=None)
    assert cfg.reads(100) == float("inf")
    sized, why = cfg.sized(100)
    assert sizes(sized) == SIZE_SMALL_TEXT and "more times than a float counts" in why


def test_a_resume_whose_saved_options_lack_the_sizes_takes_its_models(write_corpus, tmp_path):
    """A hand-edited last/config.json whose sizes are null or another: the resume reads the model's own sizes,
    and says in one line that the options differ (no traceback from weights of another shape)."""
    text, out = write_corpus(3), tmp_path / "run"
    args = ["train", str(text), "--out", str(out), "--max-steps", "4", "--eval-every", "2", "--batch-size", "4",
            "--num-steps", "16", "--embedding-dim", "8", "--hidden-size", "48", "--quiet"]
    assert CliRunner().invoke(main, args).exit_code == 0
    config_path = out / "last" / "config.json"
    config = json.loads(config_path.read_text())
    config["train"]["hidden_size"] = None
    rewrite_config(out / "last", config)
    r = CliRunner().invoke(main, ["train", str(text), "--out", str(out), "--resume", "--max-steps", "6"])
    assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert "hidden-size: None -> 48" in r.output, r.output
    config["train"]["hidden_size"] = 64  # another size than the model's: refused in one line too
    rewrite_config(out / "last", config)
    r = CliRunner().invoke(main, ["train", str(text), "--out", str(out), "--resume", "--max-steps", "6"])
    assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert "hidden-size 48 (its options say 64)" in r.output, r.output
