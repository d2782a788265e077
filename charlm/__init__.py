"""charlm: character-level recurrent language models (RNN, GRU, LSTM) in the d2l tradition."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("charlm-rnn")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from charlm.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from charlm.config import ModelConfig, TrainConfig
from charlm.corpus import Corpus, CorpusError, download, load_corpus
from charlm.evaluate import EvalResult, evaluate
from charlm.models import RNNLM
from charlm.sample import generate
from charlm.train import train  # the function; the module stays importable as charlm.train's contents
from charlm.vocab import Vocab

__all__ = ["RNNLM", "Checkpoint", "CheckpointError", "Corpus", "CorpusError", "EvalResult", "ModelConfig",
           "TrainConfig", "Vocab", "__version__", "download", "evaluate", "generate", "load_checkpoint",
           "load_corpus", "save_checkpoint", "train"]
