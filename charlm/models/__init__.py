"""Recurrent language models: charlm's own cells and the ``RNNLM`` around them."""

from charlm.models.rnnlm import RNNLM, detach_state, recurrent_layer
from charlm.models.scratch import ScratchRecurrent

__all__ = ["RNNLM", "ScratchRecurrent", "detach_state", "recurrent_layer"]
