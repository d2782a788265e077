"""charlm: character-level recurrent language models (RNN, GRU, LSTM) in the d2l tradition."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("charlm-rnn")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from charlm.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from charlm.config import ModelConfig, SampleConfig, TrainConfig
from charlm.corpus import Corpus, download, load_corpus
from charlm.errors import CharlmError, CheckpointError, ConfigError, CorpusError, TrainError, UnknownCharactersError
from charlm.evaluation import EvalResult, evaluate
from charlm.models import RNNLM
from charlm.sample import generate
from charlm.training import TrainResult, train
from charlm.vocab import Vocab

__all__ = ["RNNLM", "CharlmError", "Checkpoint", "CheckpointError", "ConfigError", "Corpus", "CorpusError",
           "EvalResult", "ModelConfig", "SampleConfig", "TrainConfig", "TrainError", "TrainResult",
           "UnknownCharactersError", "Vocab", "__version__", "download", "evaluate", "generate", "load_checkpoint",
           "load_corpus", "save_checkpoint", "train"]
