"""State kept between calls (settings, lanes, plans, agreements, meshes), in one place.

See ``state.py`` and docs/architecture.md, "Runtime".
"""

from __future__ import annotations

from .state import (
    BoundedCache,
    GroupRuntime,
    Runtime,
    Settings,
    configure,
    destroy_lanes,
    runtime,
    setup_lanes,
)

__all__ = [
    "BoundedCache",
    "GroupRuntime",
    "Runtime",
    "Settings",
    "configure",
    "destroy_lanes",
    "runtime",
    "setup_lanes",
]
