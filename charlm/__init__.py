"""charlm: character-level recurrent language models (RNN, GRU, LSTM) in the d2l tradition."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("charlm-rnn")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from charlm.config import ModelConfig
from charlm.corpus import Corpus, CorpusError, download, load_corpus
from charlm.models import RNNLM
from charlm.vocab import Vocab

__all__ = ["RNNLM", "Corpus", "CorpusError", "ModelConfig", "Vocab", "__version__", "download", "load_corpus"]
