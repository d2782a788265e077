"""The ``charlm`` command. Only this module knows click.

Exit codes: 0 success; 1 an error while running (a one-line message: bad corpus, failed download,
corrupt checkpoint, ...); 2 bad usage or a bad option value; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import click

import charlm
from charlm import corpus as corpus_mod


def _corpus_notice(known, path) -> None:
    click.echo(f"{path} not found: downloading the {known.name} corpus ({known.size:,} bytes) there first.", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(charlm.__version__, "--version", prog_name="charlm")
def main() -> None:
    """Train character-level RNN/GRU/LSTM language models, generate text and measure perplexity."""


@main.command()
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="corpora",
              help="Directory to write NAME.txt into.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def download(name: str, directory: str, quiet: bool) -> None:
    """Download a known corpus (checksum-verified) into --dir.

    NAME is one of: timemachine, tinyshakespeare. CHARLM_CORPUS_MIRROR (a directory or a base URL) is tried
    before the official URL.
    """
    try:
        path = corpus_mod.download(name, directory, progress=not quiet)
    except corpus_mod.CorpusError as exc:
        raise click.ClickException(str(exc)) from None
    known = corpus_mod.KNOWN_CORPORA[name]
    click.echo(f"{path}  ({known.size:,} bytes, sha256 verified) - {known.licence}")


@main.command()
@click.argument("corpus", type=click.Path(dir_okay=True))
@click.option("--preprocess", type=click.Choice(corpus_mod.PREPROCESS_MODES), default="raw",
              help="raw: the text as is; lower: lower-cased; letters: d2l's rule (letters and spaces, lower case).")
def stats(corpus: str, preprocess: str) -> None:
    """Print a corpus's size and vocabulary after preprocessing.

    A missing CORPUS whose file stem names a known corpus (corpora/timemachine.txt) is downloaded first.
    """
    try:
        path = corpus_mod.ensure_corpus(corpus, on_download=_corpus_notice)
        c = corpus_mod.load_corpus(path, preprocess=preprocess)
    except corpus_mod.CorpusError as exc:
        raise click.ClickException(str(exc)) from None
    sample = "".join(c.vocab.itos[1:41])
    click.echo(f"{path}: {len(c):,} characters, {len(c.vocab)} symbols (with <unk>), preprocess={preprocess}")
    click.echo(f"most frequent: {sample!r}")


if __name__ == "__main__":  # pragma: no cover
    main()
