"""``ldm-eval``: metrics on generated images and autoencoders (the subcommands are trainer/evaluate/cli.py)."""

from __future__ import annotations

import sys

from ..evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
