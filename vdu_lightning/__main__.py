"""``python -m vdu_lightning`` is the ``vdu`` command."""

from vdu_lightning.cli import main

if __name__ == "__main__":
    main()
