"""The documentation is checked like code: README.md, CONTRIBUTING.md, CHANGELOG.md and docs/.

- every ``charlm ...`` command line in their shell blocks parses against the click group (an unknown
  command or option, a bad value or a missing argument fails, naming the file and line; nothing runs),
  and every ``charlm ...`` in inline code names a real command and real options;
- their Python code blocks run, in order, one namespace per page (Sybil), in a scratch directory
  holding the Time Machine corpus and a tiny trained run at ``checkpoints/timemachine``; a block
  that must not run is preceded by ``<!-- skip: next -->`` (kept rare);
- the CLI reference page renders a section for every command of the group.

The strict Sphinx build (``sphinx-build -W --keep-going -n``) is run by ``.ci/run``.
"""

from __future__ import annotations

import contextlib
import html
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import click
import pytest

from charlm.cli import main

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted([REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "CHANGELOG.md",
                *(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)])
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "shell-session", "zsh"}
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*\{?([\w+-]*)\}?")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def fenced_blocks(path: Path):
    """(language, line number of the first line of content, lines) of each fenced block of a page."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, language, start = m.group(1), m.group(2).lower(), i + 1
        j = start
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        yield language, start + 1, lines[start:j]
        i = j + 1


def shell_commands(path: Path):
    """(line number, shell text) of each logical line of the shell blocks (continuations joined)."""
    for language, first, lines in fenced_blocks(path):
        if language not in SHELL_LANGUAGES:
            continue
        pending, where = "", None
        for number, line in enumerate(lines, first):
            text = line.rstrip()
            if language in ("console", "shell-session"):
                if not text.startswith("$ ") and not pending:
                    continue  # output
            text = text[2:] if text.startswith("$ ") and not pending else text
            where = where if pending else number
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            yield where, pending + text
            pending = ""


def charlm_invocations(shell: str) -> list[list[str]]:
    """The argument lists given to ``charlm`` (or ``python -m charlm``, ``torchrun ... -m charlm``) in a
    line of shell: each simple command of an ``&&``/``;``/``|`` chain, after its variable assignments."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens, found, simple = list(lexer), [], []
    for token in [*tokens, ";"]:
        if token not in _OPERATORS:
            simple.append(token)
            continue
        words = [w for w in simple if w not in (">", ">>", "<")]
        while words and _ASSIGNMENT.match(words[0]):
            words.pop(0)
        if words and Path(words[0]).name == "charlm":
            found.append(words[1:])
        elif "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "charlm":
            found.append(words[words.index("-m") + 2:])
        simple = []
    return found


def parse_command_line(args: list[str]) -> None:
    """Parse ``charlm ARGS`` as the click group would, without running anything; raises click's error."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            if not args or args[0].startswith("-"):
                main.make_context("charlm", list(args))
                return
            parent = click.Context(main, info_name="charlm", **main.context_settings)
            name, command, rest = main.resolve_command(parent, list(args))
            command.make_context(name, rest, parent=parent)
        except click.exceptions.Exit:  # --help, --version
            return


def command_lines():
    for page in PAGES:
        for number, shell in shell_commands(page):
            for args in charlm_invocations(shell):
                yield pytest.param(args, id=f"{_rel(page)}:{number}")


@pytest.mark.parametrize("args", list(command_lines()))
def test_doc_command_line_parses(args):
    try:
        parse_command_line(args)
        error = None
    except click.ClickException as exc:
        error = f"charlm {shlex.join(args)}\n    {type(exc).__name__}: {exc.format_message()}"
    if error:
        pytest.fail(error, pytrace=False)


_INLINE = re.compile(r"(?<!`)`(charlm [^`]+)`(?!`)")


def inline_commands():
    for page in PAGES:
        in_block = False
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if _FENCE.match(line):
                in_block = not in_block
                continue
            if not in_block:
                for m in _INLINE.finditer(line):
                    yield pytest.param(m.group(1), id=f"{_rel(page)}:{number}")


@pytest.mark.parametrize("text", list(inline_commands()))
def test_doc_inline_command_names_real_options(text):
    """``charlm eval RUN --dynamic`` in prose: the command exists and each option is one of its own (the
    line need not be complete: only names are checked)."""
    words = shlex.split(text)[1:]
    command = main
    if words and not words[0].startswith("-"):
        command = main.commands.get(words[0])
        if command is None:
            pytest.fail(f"`{text}`: no such command {words[0]!r}", pytrace=False)
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
    for word in words:
        if word.startswith("-") and not re.fullmatch(r"-?\d+(\.\d+)?", word) and word.split("=")[0] not in known:
            pytest.fail(f"`{text}`: charlm {command.name} has no option {word}", pytrace=False)


def test_command_line_extraction():
    """The extractor sees through prompts, variables, chains, continuations and torchrun."""
    assert charlm_invocations("CHARLM_X=1 charlm train a.txt && charlm eval r # note") == [
        ["train", "a.txt"], ["eval", "r"]]
    assert charlm_invocations("python3 -m venv .venv && pip install -e . && charlm train c.txt") == [["train", "c.txt"]]
    assert charlm_invocations("torchrun --nproc-per-node 2 -m charlm train big/ --batch-size 32") == [
        ["train", "big/", "--batch-size", "32"]]
    assert charlm_invocations("echo charlm train") == []
    with pytest.raises(click.NoSuchOption):
        parse_command_line(["train", "c.txt", "--no-such-option"])
    with pytest.raises(click.UsageError):
        parse_command_line(["no-such-command"])
    with pytest.raises(click.BadParameter):
        parse_command_line(["train", "c.txt", "--cell", "transformer"])
    parse_command_line(["train", "--help"])


# ---------------------------------------------------------------------------------------------------
# The Python code blocks


@pytest.fixture(scope="module")
def doc_workspace(tmp_path_factory, mirror):
    """A directory as a reader has it after the quickstart: the corpus, and a (tiny) trained run."""
    import charlm

    root = tmp_path_factory.mktemp("doc-workspace")
    (root / "corpora").mkdir()
    shutil.copy(mirror / "timemachine.txt", root / "corpora" / "timemachine.txt")
    here = os.getcwd()
    os.chdir(root)
    try:
        charlm.train(charlm.TrainConfig(corpus="corpora/timemachine.txt", hidden_size=16, num_layers=1,
                                        embedding_dim=8, max_steps=4, eval_every=2, batch_size=8, num_steps=16))
    finally:
        os.chdir(here)
    return root


def _python_pages():
    return [pytest.param(p, id=_rel(p)) for p in PAGES
            if any(language in ("python", "py") for language, _, _ in fenced_blocks(p))]


@pytest.mark.parametrize("page", _python_pages())
def test_doc_python_blocks_run(page, doc_workspace, tmp_path, monkeypatch):
    from sybil import Sybil
    from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

    work = tmp_path / "work"
    shutil.copytree(doc_workspace, work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    document = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()]).parse(page)
    document.namespace["__name__"] = "__docs__"
    examples = list(document)
    assert examples, f"{_rel(page)}: no code block found"
    for example in examples:
        try:
            example.evaluate()
            error = None
        except Exception as exc:
            lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == page]
            where = f", line {lines[-1]}" if lines else ""
            error = (f"{_rel(page)}: the code block at line {example.line} failed{where}:\n"
                     f"{''.join(traceback.format_exception_only(exc)).strip()}")
        if error:
            pytest.fail(error, pytrace=False)


# ---------------------------------------------------------------------------------------------------
# The CLI reference page


def test_cli_reference_lists_every_command(tmp_path):
    """Render docs/reference/cli.md alone (sphinx-click, text builder) and find each command's section."""
    pytest.importorskip("sphinx_click")
    src = tmp_path / "src"
    src.mkdir()
    page = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    (src / "index.md").write_text(re.sub(r"\{doc\}`[^`]*`", "the guide", page), encoding="utf-8")
    (src / "conf.py").write_text('extensions = ["myst_parser", "sphinx_click"]\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "sphinx", "-q", "-b", "text", str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "index.txt").read_text(encoding="utf-8")
    headings = set(re.findall(r"^(\S[^\n]*)\n[-=~^*]{3,}$", text, flags=re.M))
    missing = sorted(set(main.commands) - headings)
    assert not missing, f"docs/reference/cli.md renders no section for: {', '.join(missing)}"
    for name, command in main.commands.items():
        assert f"charlm {name} [OPTIONS]" in text, f"no usage line for charlm {name}"


def test_the_cli_reference_as_the_site_shows_it_has_no_dash_for_an_options_hyphens(tmp_path):
    """#35: the site printed option names in the commands' help texts with an en dash ("into \u2013dir",
    "charlm train \u2013precision bf16": docutils' smart quotes), so an option copied from the page failed.
    docs/reference/cli.md is built to HTML with the site's own configuration (docs/conf.py) and read as shown."""
    pytest.importorskip("sphinx_click")
    src = tmp_path / "src"
    src.mkdir()
    page = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    (src / "index.md").write_text(re.sub(r"\{doc\}`[^`]*`", "the guide", page), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "sphinx", "-q", "-b", "html", "-c", str(DOCS), str(src),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shown = html.unescape(re.sub(r"<[^>]+>", "", (tmp_path / "out" / "index.html").read_text(encoding="utf-8")))
    dashed = re.findall(r".{0,30}[\u2013\u2014]\w.{0,10}", shown)
    assert not dashed, f"an en or em dash where an option's -- belongs: {dashed[:5]}"
    for name, command in main.commands.items():  # every option a help text names is shown as typed
        helps = " ".join([command.help or "", *(getattr(p, "help", None) or "" for p in command.params)])
        for option in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", helps)):
            assert option in shown, f"charlm {name}'s help names {option}, which the page does not show"
    assert "charlm train --precision bf16" in shown  # (charlm env's help, an example the issue names)


def test_every_public_name_has_a_docstring_and_a_place_in_the_reference():
    import charlm

    page = (DOCS / "reference" / "python-api.md").read_text(encoding="utf-8")
    for name in charlm.__all__:
        obj = getattr(charlm, name)
        if name != "__version__":
            doc = (obj.__doc__ or "").strip()
            assert doc and not doc.startswith(f"{name}("), f"charlm.{name} has no docstring of its own"
        assert re.search(rf"^\.\. auto\w+:: charlm\.{re.escape(name)}$", page, flags=re.M), \
            f"charlm.{name} is not on docs/reference/python-api.md"
