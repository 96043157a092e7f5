"""Command-line arguments shared by the ``ldm-*`` tools: one-line errors and bounded numbers."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``ldm-data CMD: error: ...``, exit code 2), without the usage
    block; ``-h`` shows it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_at_least(low: int, meaning: str = ""):
    """An argparse type: an integer >= ``low`` (``meaning``: what ``low`` itself means, if special)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{meaning}, got {value}")
        return value

    return parse
