"""Numbers past what charlm holds (#35): every numeric option of every command, the library's settings
(TrainConfig, ModelConfig, SampleConfig, dynamic evaluation's, ServeConfig) and the HTTP request fields take
huge values, NaN, infinities and negative zero without a traceback: each is accepted and works, or is refused
in one line (the CLI: click's own parameter check, exit 2; the library: ConfigError; HTTP: a 400).

The options are listed from the click group itself, so a new option is walked as soon as it exists (a new
command with numeric options must get a command line below, and the walk says so).
"""

import dataclasses
import datetime
import json
import math

import click
import pytest
import torch
from click.testing import CliRunner
from serving import Server, make_checkpoint

from charlm.cli import main
from charlm.config import DIST_TIMEOUT_RANGE, MAX_LR, ModelConfig, SampleConfig, TrainConfig
from charlm.errors import ConfigError

# What a number option may be given as: past float64's and float32's range, a timeout past timedelta's, an
# integer past int64's, NaN, the infinities and both negative zeros.
EXTREMES = ["1e300", "3.5e38", "1e15", str(2**70), "nan", "inf", "-inf", "-0.0", "-0"]
VALUES = [1e300, 3.5e38, 1e15, 2**70, float("nan"), float("inf"), float("-inf"), -0.0]

# Per command, a command line whose inputs do not exist: a value that passes the options' checks then fails
# there, in one line, before any work. And, for the commands that run in a moment, one on real inputs (tiny),
# run with each value that passed: it must work or say one line. (charlm serve runs until stopped: its
# numbers are walked through ServeConfig and a live server below.)
MISSING = {
    "train": lambda d: ["train", str(d / "no-such-corpus.txt"), "--out", str(d / "no-run")],
    "eval": lambda d: ["eval", str(d / "no-run"), "--dynamic"],  # (a --dynamic-* option needs it)
    "generate": lambda d: ["generate", "--checkpoint", str(d / "no-run"), "ab"],
    "serve": lambda d: ["serve", str(d / "no-run")],
    "prepare": lambda d: ["prepare", str(d / "no-such-corpus.txt")],
    "stats": lambda d: ["stats", str(d / "no-such-corpus.txt")],
    "tune": lambda d: ["tune", str(d / "no-such-corpus.txt"), "--trials", "1", "--out", str(d / "no-tune")],
}
TRAIN = ["--hidden-size", "4", "--embedding-dim", "2", "--num-layers", "1", "--batch-size", "2", "--num-steps", "8",
         "--max-steps", "1", "--epochs", "1", "--eval-every", "1", "--quiet"]
REAL = {
    "train": lambda d, n: ["train", str(d / "corpus.txt"), *TRAIN, "--out", str(d / f"run-{n}")],
    "eval": lambda d, n: ["eval", str(d / "run"), str(d / "corpus.txt"), "--dynamic", "--dynamic-prior", "50"],
    "generate": lambda d, n: ["generate", "--checkpoint", str(d / "run"), "--length", "5", "ab"],
    "prepare": lambda d, n: ["prepare", str(d / "corpus.txt"), "--quiet"],
    "stats": lambda d, n: ["stats", str(d / "corpus.txt")],
}
# Accepted, and not run for real here: 2**70 characters stream for ever (Ctrl-C ends them, as any generation).
NOT_RUN = {("generate", "--length")}


def numeric_options():
    """(command, option) for every option of every command whose value is a number."""
    out = []
    for name, command in sorted(main.commands.items()):
        for param in command.params:
            if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
                assert isinstance(param, click.Option), f"charlm {name}: a numeric argument: walk it here too"
                out.append((name, param.opts[0]))
    return out


def with_option(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``option`` given ``value`` (in place of its value there, if it has one)."""
    if option in args:
        i = args.index(option)
        args = args[:i] + args[i + 2:]
    return [*args, option, value]


def assert_worked_or_one_line(result, what: str) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{what}: {type(result.exception).__name__}: {result.exception}\n{result.output}"
    assert "Traceback" not in result.output, f"{what}:\n{result.output}"
    assert result.exit_code in (0, 1, 2), f"{what}: exit {result.exit_code}\n{result.output}"
    if result.exit_code:
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and errors[0] == result.output.strip().splitlines()[-1], f"{what}:\n{result.output}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    d = tmp_path_factory.mktemp("numbers")
    (d / "corpus.txt").write_text("the time traveller smiled and the machine was gone\n" * 8)
    r = CliRunner().invoke(main, REAL["train"](d, 0)[:-1] + [str(d / "run")])
    assert r.exit_code == 0, r.output
    return d


def test_every_numeric_option_of_every_command_is_walked():
    options = numeric_options()
    assert {c for c, _ in options} <= set(MISSING), "a command with numeric options: give it a command line above"
    assert ("train", "--dist-timeout") in options and ("eval", "--dynamic-lr") in options


@pytest.mark.slow
@pytest.mark.parametrize("command, option", numeric_options())
def test_every_numeric_option_takes_huge_nan_infinite_and_negative_zero_values_without_a_traceback(
        sandbox, command, option):
    """#35: --dynamic-lr 1e300 (a float32 overflow) and --lr 1e300 were tracebacks; --dist-timeout 1e15 was one
    under torchrun (timedelta overflow); --hidden-size 2**70 was one, --num-layers 2**70 ran for ever."""
    runner = CliRunner()
    for n, value in enumerate(EXTREMES):
        what = f"charlm {command} {option} {value}"
        r = runner.invoke(main, with_option(MISSING[command](sandbox), option, value))
        assert_worked_or_one_line(r, what)
        if r.exit_code == 2:
            assert "Invalid value for" in r.output, what  # click's own check, not a later usage error
            continue
        if command in REAL and (command, option) not in NOT_RUN:
            r = runner.invoke(main, with_option(REAL[command](sandbox, f"{option}-{n}"), option, value))
            assert_worked_or_one_line(r, what + " (on real inputs)")


def test_tune_refuses_durations_past_what_it_can_size_a_trial_with(sandbox):
    """A --trial-time of 1e300 seconds overflowed to an infinite number of characters: a traceback once the
    corpus was read; now click's check (and TuneConfig's) refuses any duration past MAX_SECONDS."""
    pytest.importorskip("optuna")
    from charlm.tune import TuneConfig

    corpus = sandbox / "tune-corpus.txt"  # (tune takes 1,000 training characters at least)
    corpus.write_text((sandbox / "corpus.txt").read_text() * 8)
    for option in ("--trial-time", "--time-budget", "--final-time"):
        r = CliRunner().invoke(main, ["tune", str(corpus), "--trials", "1", option, "1e300",
                                      "--out", str(sandbox / "tune")])
        assert r.exit_code == 2 and "is not in the range 0<x<=1000000000.0" in r.output, r.output
        assert not (sandbox / "tune").exists()
    for field in ("time_budget", "trial_time", "final_time"):
        for value in (1e300, float("inf"), float("nan")):
            with pytest.raises(ConfigError, match="must be > 0 and at most 1e\\+09 seconds"):
                TuneConfig(corpus="c.txt", trials=1, **{field: value})


# ---------------------------------------------------------------------------------------------
# The library's settings


def _float_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if "float" in str(f.type)]


def _int_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if str(f.type).startswith("int")]


@pytest.mark.parametrize("field", _float_fields(TrainConfig) + _int_fields(TrainConfig))
def test_train_config_refuses_numbers_it_cannot_hold(field):
    """#35: TrainConfig took inf and 1e300 for a learning rate, 1e15 seconds for dist_timeout, 2**70 units."""
    for value in VALUES:
        try:
            cfg = TrainConfig(corpus="c.txt", **{field: value})
        except ConfigError:
            continue
        assert not (isinstance(value, float) and math.isnan(value)), f"{field}={value} accepted"
        if field == "dist_timeout":
            datetime.timedelta(seconds=cfg.dist_timeout)  # what torch.distributed is given
        if field == "lr":  # Adam's first step divides it by 1 - 0.9
            assert math.isfinite(torch.tensor(cfg.lr / (1 - 0.9), dtype=torch.float32).item())
        if isinstance(value, float):
            assert math.isfinite(getattr(cfg, field)), f"{field}={value} accepted"
        model = cfg.model_config(100)
        assert model.hidden_size < 2**31 and model.num_layers <= 1024 and model.embedding_dim < 2**31


def test_the_limits_hold_where_they_go():
    datetime.timedelta(seconds=DIST_TIMEOUT_RANGE[1])
    assert math.isfinite(torch.tensor(MAX_LR * 10, dtype=torch.float32).item())
    with pytest.raises(ConfigError, match="dist timeout must be from 1 to 604,800 seconds"):
        TrainConfig(corpus="c.txt", dist_timeout=1e15)
    with pytest.raises(ConfigError, match="learning rate must be > 0 and at most 1e\\+30"):
        TrainConfig(corpus="c.txt", lr=1e300)
    with pytest.raises(ConfigError, match="hidden_size must be an integer >= 1 and at most 2,147,483,647"):
        ModelConfig(vocab_size=10, hidden_size=2**70)
    with pytest.raises(ConfigError, match="num_layers must be an integer >= 1 and at most 1,024"):
        ModelConfig(vocab_size=10, num_layers=2**70)


@pytest.mark.parametrize("field", ["temperature", "top_p", "top_k", "length", "seed", "num_samples"])
def test_sample_config_refuses_numbers_it_cannot_hold(field):
    for value in VALUES:
        try:
            cfg = SampleConfig(**{field: value})
        except ConfigError:
            continue
        got = getattr(cfg, field)
        assert got == got and got not in (float("inf"), float("-inf")), f"{field}={value} accepted"
        assert cfg.num_samples <= 65_536


def test_dynamic_evaluation_settings_refuse_numbers_it_cannot_hold():
    """#35: dynamic_settings checked nothing (an lr of 1e300 overflowed float32 in the first step), and an unknown
    rule was a bare ValueError."""
    from charlm.evaluation import dynamic_settings

    for lr in (1e300, 3.5e38, float("nan"), float("inf"), -0.0, 0.0, -1.0):
        with pytest.raises(ConfigError, match="dynamic evaluation's lr must be > 0 and at most 1e\\+30"):
            dynamic_settings("rms", lr=lr)
    for steps in (0, -1, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match="num_steps must be an integer >= 1"):
            dynamic_settings("sgd", num_steps=steps)
    for decay in (float("nan"), float("inf"), 1.5, -1e-9):
        with pytest.raises(ConfigError, match="decay must lie in \\[0, 1\\]"):
            dynamic_settings("rms", decay=decay)
    with pytest.raises(ConfigError, match="unknown dynamic evaluation rule 'adam'; choose one of rms, sgd"):
        dynamic_settings("adam")
    assert dynamic_settings("sgd", lr=MAX_LR, num_steps=2**70, decay=-0.0) == (MAX_LR, 2**70, 0.0)


def test_dynamic_evaluation_that_diverges_is_one_line(sandbox, monkeypatch):
    """An lr float32 holds can still make the loss infinite: one line naming the lr, not a NaN figure."""
    from charlm import evaluation

    def overflowing_step(params, trained, lr, decay):  # what a step too large for float32 does to the weights
        for p in params:
            p.fill_(float("inf"))

    monkeypatch.setattr(evaluation, "_sgd_step", overflowing_step)
    r = CliRunner().invoke(main, ["eval", str(sandbox / "run"), str(sandbox / "corpus.txt"), "--dynamic",
                                  "--dynamic-lr", "1e30", "--dynamic-rule", "sgd", "--dynamic-steps", "50"])
    assert r.exit_code == 1, r.output
    assert "dynamic evaluation diverged at lr 1e+30 (its loss is nan): take a smaller lr (--dynamic-lr)" in r.output
    assert_worked_or_one_line(r, "eval --dynamic-lr 1e30")


def test_evaluate_refuses_sizes_it_cannot_read_with(sandbox):
    from charlm import evaluate, load_checkpoint

    ckpt = load_checkpoint(sandbox / "run")
    ids = ckpt.vocab.encode("the time machine")
    for kw in ({"batch_size": 0}, {"num_steps": 0}, {"batch_size": 1.5}, {"num_steps": float("nan")}):
        with pytest.raises(ConfigError, match="must be an integer >= 1"):
            evaluate(ckpt.model, ids, **kw)
    assert evaluate(ckpt.model, ids, batch_size=2**70, num_steps=2**70).tokens == 14  # 7 rows of 2


# ---------------------------------------------------------------------------------------------
# The server: ServeConfig and the request bodies


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("numbers-serve"))


SERVE_FIELDS = ["port", "max_length", "max_prompt", "max_samples", "max_seconds", "slots", "queue_size", "max_body",
                "chunk", "stream_interval"]


def test_serve_config_refuses_numbers_it_cannot_hold_and_a_server_on_the_others_works(ckpt):
    """#35: ServeConfig checked none of its numbers (a NaN slot count, an infinite interval)."""
    from charlm.serve import ServeConfig

    assert set(SERVE_FIELDS) == set(_float_fields(ServeConfig) + _int_fields(ServeConfig))
    for field in SERVE_FIELDS:
        for value in [*VALUES, -1, 0, 1.5]:
            try:
                ServeConfig(**{field: value})
            except ConfigError as exc:
                assert field in str(exc).replace("-", "_")
                continue
            assert isinstance(value, int) or math.isfinite(value), f"{field}={value} accepted"
            if field == "port" or value in (0, -0.0):
                continue
            with Server(ckpt, **{field: value}) as server:  # accepted: it serves
                status, answer, _ = server.json("POST", "/generate", {"prompt": "the", "length": 5})
                assert status == 200, (field, value, answer)
                assert len(answer["text"]) == 5
                assert server.json("GET", "/info")[0] == 200


def _numeric_fields(model) -> list[str]:
    return [name for name, f in model.model_fields.items() if any(t in str(f.annotation) for t in ("int", "float"))]


def test_every_numeric_request_field_takes_huge_nan_infinite_and_negative_zero_values(ckpt):
    """Each answer is 200 with text from the vocabulary, or 400 with the JSON error body in one line."""
    from charlm.serve import schemas

    with Server(ckpt) as server:
        for path, model, length in (("/generate", schemas.GenerateBody, "length"),
                                    ("/v1/completions", schemas.CompletionBody, "max_tokens")):
            fields = _numeric_fields(model)
            assert {"temperature", "top_p", "top_k", "seed"} <= set(fields)
            for field in fields:
                for value in ["1e300", "3.5e38", "1e15", str(2**70), "NaN", "Infinity", "-Infinity", "-0.0", "-0"]:
                    extra = "" if field == length else f', "{length}": 4'
                    raw = f'{{"prompt": "the", "{field}": {value}{extra}}}'.encode()
                    r, data = server.request("POST", path, raw=raw, headers={"Content-Type": "application/json"})
                    body = json.loads(data)
                    if r.status == 400:
                        assert "\n" not in body["error"]["message"], (field, value)
                        continue
                    assert r.status == 200, (field, value, body)
                    text = body["text"] if path == "/generate" else body["choices"][0]["text"]
                    assert set(text) <= set(ckpt.vocab.itos[1:]), (field, value, text)
