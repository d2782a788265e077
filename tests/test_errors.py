"""Every error a user can cause is a CharlmError (one line from the CLI, one exception class for the library):
no bare ValueError, TypeError or KeyError is raised where user input reaches."""

import re
from pathlib import Path

import pytest

import charlm
from charlm.errors import CharlmError, ConfigError

PACKAGE = Path(charlm.__file__).parent
# The only builtin exceptions charlm raises itself: Python's own protocols, where callers catch exactly these
# (indexing a TokenReader past its end or with something that is no index, as a list would; a name the
# package's lazy module __getattr__ does not have).
PROTOCOL = {("tokens.py", "IndexError"), ("tokens.py", "TypeError"), ("__init__.py", "AttributeError")}


def test_charlm_raises_no_bare_builtin_error_outside_pythons_protocols():
    """#35: int8_weight_range, dynamic_settings and the serving engine raised bare ValueErrors."""
    raised = set()
    for path in PACKAGE.rglob("*.py"):
        for match in re.finditer(r"raise (ValueError|TypeError|KeyError|IndexError|RuntimeError|AttributeError)\b",
                                 path.read_text(encoding="utf-8")):
            raised.add((path.name, match.group(1)))
    assert raised <= PROTOCOL, f"raise a CharlmError subclass instead: {sorted(raised - PROTOCOL)}"


def test_the_engine_refuses_a_request_larger_than_its_slots_with_a_config_error():
    import numpy as np

    from charlm import RNNLM, Vocab
    from charlm.config import SampleConfig
    from charlm.serve.engine import Engine, Request

    vocab = Vocab.from_text("abc")
    engine = Engine(RNNLM(len(vocab), hidden_size=4), vocab, slots=2)
    with pytest.raises(ConfigError, match="3 samples need more than the 2 slots"):
        engine.submit(Request(np.zeros(1, dtype=np.int64), SampleConfig(num_samples=3), None))


def test_config_error_is_a_value_error_and_a_charlm_error():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, CharlmError)
