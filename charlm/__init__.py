"""charlm: character-level recurrent language models (RNN, GRU, LSTM) in the d2l tradition.

The public names below are imported on first use (PEP 562), so ``import charlm`` and the
``charlm`` command's ``--help`` and ``--version`` do not load torch.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("charlm-rnn")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_HOMES = {  # public name -> the module that defines it
    "Checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "ModelConfig": "config", "SampleConfig": "config", "TrainConfig": "config",
    "Corpus": "corpus", "download": "corpus", "load_corpus": "corpus",
    "CharlmError": "errors", "CheckpointError": "errors", "ConfigError": "errors", "CorpusError": "errors",
    "TrainError": "errors", "UnknownCharactersError": "errors",
    "EvalResult": "evaluation", "evaluate": "evaluation",
    "RNNLM": "models",
    "generate": "sample",
    "TrainResult": "training", "train": "training",
    "Vocab": "vocab",
}

__all__ = sorted([*_HOMES, "__version__"])


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'charlm' has no attribute {name!r}")
    value = getattr(import_module(f"charlm.{home}"), name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__():
    return sorted([*globals(), *_HOMES])
