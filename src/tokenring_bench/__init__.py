"""tokenring_bench: the ``tokenring`` command (``demo``, ``bench``), the benchmark's cases,
methods and peers, and plots. Needs the ``bench`` extra (rich, matplotlib); the
library itself (``tokenring``) needs torch alone."""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["main"]

EXTRAS = ("rich", "matplotlib")


def main(argv: list[str] | None = None) -> int:
    """The ``tokenring`` console command; says how to install what it needs if it is missing."""
    missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"tokenring: the command needs {', '.join(missing)} (the 'bench' extra): "
            "pip install 'tokenring-attention[bench]'",
            file=sys.stderr,
        )
        return 2
    from .cli import main as cli_main

    return cli_main(argv)
