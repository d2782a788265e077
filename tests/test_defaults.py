"""The training defaults chosen by measurement (README, "Why the defaults are what they are"), the
patience that follows the schedule, and runs saved before these defaults: they resume as they began."""

import json

from click.testing import CliRunner

from charlm.cli import main
from charlm.config import D2L_PRESET, PATIENCE_AUTO, SIZED_FIELDS, TrainConfig
from conftest import rewrite_config


def test_the_defaults_are_the_measured_ones():
    cfg = TrainConfig(corpus="x.txt")
    assert cfg.dropout == 0.0  # the sizes and the AWD regularisers: by the text and the budget (sized, below)
    assert all(getattr(cfg, name) is None for name in SIZED_FIELDS)
    assert cfg.lr_schedule == "hold-decay" and cfg.patience == PATIENCE_AUTO and cfg.epochs == 20
    assert cfg.weight_decay is None  # by corpus size:
    assert cfg.resolved_weight_decay(153_522) == 0.3 and cfg.resolved_weight_decay(1_003_855) == 0.0
    assert TrainConfig(corpus="x", weight_decay=0.1).resolved_weight_decay(1000) == 0.1  # given: as given
    m = cfg.model_config(30, num_chars=10**6)
    assert (m.dropout, m.weight_drop, m.dropout_input, m.dropout_hidden, m.dropout_output) == (0.0, 0.25, 0.05, 0.15,
                                                                                              0.25)


def test_patience_follows_the_schedule_unless_given():
    assert TrainConfig(corpus="x").resolved_patience() is None  # a planned schedule ends the run itself
    assert TrainConfig(corpus="x", lr_schedule="plateau").resolved_patience() == 5
    assert TrainConfig(corpus="x", lr_schedule="plateau", patience=None).resolved_patience() is None
    assert TrainConfig(corpus="x", patience=3).resolved_patience() == 3


def test_the_d2l_recipe_keeps_the_books_settings():
    cfg = TrainConfig(corpus="x", **D2L_PRESET)
    assert cfg.lr_schedule == "plateau" and cfg.lr_decay == 1.0  # a constant learning rate
    assert cfg.model_config(30).regularised is False and cfg.resolved_patience() is None


def test_a_config_saved_before_the_new_defaults_reads_back_as_it_was():
    old = {k: v for k, v in TrainConfig(corpus="x", dropout=None, weight_drop=0.0, dropout_input=0.0,
                                        dropout_hidden=0.0, dropout_output=0.0, lr_schedule="plateau",
                                        patience=5, weight_decay=0.0).to_dict().items()
           if k not in ("weight_drop", "dropout_input", "dropout_hidden", "dropout_output", "lr_schedule",
                        "weight_decay")}
    cfg = TrainConfig.from_dict(old)
    assert (cfg.weight_drop, cfg.dropout_input, cfg.dropout_hidden, cfg.dropout_output, cfg.weight_decay) == \
        (0.0,) * 5
    assert cfg.lr_schedule == "plateau" and cfg.resolved_dropout(1000) == 0.5 and cfg.resolved_patience() == 5


def test_a_run_saved_before_the_new_defaults_resumes_with_its_own_settings(corpus, tmp_path):
    out = tmp_path / "run"
    old_options = ["--dropout", "0.5", "--weight-drop", "0", "--dropout-input", "0", "--dropout-hidden", "0",
                   "--dropout-output", "0", "--lr-schedule", "plateau", "--patience", "5", "--weight-decay", "0"]
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(out), "--max-steps", "10", "--eval-every", "5",
                                  "--hidden-size", "8", "--num-layers", "1", "--batch-size", "4", "--num-steps", "16",
                                  "--quiet", *old_options])
    assert r.exit_code == 0, r.output
    # as the run directory of an older charlm: its config names none of the fields added since
    config_path = out / "last" / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("weight_drop", "dropout_input", "dropout_hidden", "dropout_output", "lr_schedule", "weight_decay"):
        del config["train"][key]
    rewrite_config(out / "last", config)
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(out), "--resume", "--max-steps", "20",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    train = json.loads(config_path.read_text())["train"]
    assert train["lr_schedule"] == "plateau" and train["weight_drop"] == 0.0 and train["dropout"] == 0.5
    assert train["weight_decay"] == 0.0  # (with 0.3 the saved one-group Adam state would not even load)
    assert json.loads(config_path.read_text())["model"].get("weight_drop", 0.0) == 0.0
