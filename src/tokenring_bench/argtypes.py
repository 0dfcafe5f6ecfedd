"""argparse types the ``tokenring`` subcommands share."""

from __future__ import annotations

import argparse

__all__ = ["DTYPE_HELP", "DTYPE_METAVAR", "dtype_name", "positive_int", "positive_seconds"]

# every spelling the command takes for a dtype, and the torch name it means
_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}
DTYPE_METAVAR = "{bf16,fp16,fp32}"
DTYPE_HELP = "bf16 (or bfloat16), fp16 (or float16) or fp32 (or float32)"


def positive_int(text: str) -> int:
    """An integer of at least 1 (sizes, counts)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_seconds(text: str) -> float:
    """A positive number of seconds (timeouts)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def dtype_name(text: str) -> str:
    """The torch name (``bfloat16``, ``float16``, ``float32``) of a dtype spelled either
    way: every subcommand takes the short and the long spelling alike."""
    try:
        return _DTYPE_ALIASES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}; valid values are {DTYPE_HELP}"
        ) from None
