"""The page of ``charlm export --format web`` (see :mod:`charlm.export.web`)."""
