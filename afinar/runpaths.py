"""Where a run lives while it is written: `<output>.partial/` until it is complete (see runs.py)."""

from __future__ import annotations

from pathlib import Path

PARTIAL = ".partial"


def partial(output: str | Path) -> Path:
    """The folder a run is built in before it is renamed to `output`."""
    output = Path(output)
    return output.with_name(output.name + PARTIAL)


def output_of(folder: str | Path) -> Path:
    """The --output a user typed for `folder` (the run itself, or its `<output>.partial` while training)."""
    folder = Path(folder)
    return folder.with_name(folder.name.removesuffix(PARTIAL))
