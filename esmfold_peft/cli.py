"""Small pieces shared by the command-line scripts."""

from __future__ import annotations

import argparse


def int_at_least(minimum: int):
    """An argparse `type` accepting integers >= minimum, with a clear message otherwise."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
