"""tokenring_bench: the ``tokenring`` command (``demo``, ``bench``), the benchmark's cases,
methods and peers, and plots. Needs the ``bench`` extra (rich, matplotlib); the
library itself (``tokenring``) needs torch alone."""

from __future__ import annotations

import importlib.util
import os
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

    status = cli_main(argv)
    if argv is None and sys.argv[1:2] == ["plan"]:
        # ``tokenring plan`` from the shell has nothing left to clean up (its workers are
        # joined, its files closed): skip the interpreter's teardown of torch's modules,
        # 0.4-0.6 s of a 2.5 s answer on 2 cores (benchmarks/planner_speed.py).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
