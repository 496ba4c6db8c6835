"""What the commands show a person: one console and one progress-bar layout for every job."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()
if not console.is_terminal:  # logs and CI: room for the result tables instead of 80 columns
    console = Console(width=120)


def progress(disable: bool = False, transient: bool = False) -> Progress:
    """A bar with the task's description, counts, elapsed and remaining time, and its `info`."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=disable,
        transient=transient,
    )
