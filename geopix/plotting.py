"""Matplotlib for GeoPix's figures: the file-only backend, chosen before pyplot is first imported,
so figures render on workers and CI machines without a display."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
