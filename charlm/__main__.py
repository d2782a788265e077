"""``python -m charlm`` is the ``charlm`` command."""

from charlm.cli import run

if __name__ == "__main__":
    run()
