"""``python -m tokenring_bench`` is the ``tokenring`` command, so that ``torchrun -m
tokenring_bench calibrate ...`` runs it under torchrun (docs/scaling.md)."""

import sys

from . import main

sys.exit(main())
