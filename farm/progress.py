"""A live progress bar for local runs: frames rendered, fps and ETA, overall and per video."""

from __future__ import annotations

import sys
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressBar:
    """Consumes the driver's events (``update(event, data)``); draws nothing when disabled or not a TTY."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("frames"),
            TextColumn("{task.fields[fps]:>6.1f} fps"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.overall = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, event: str, data: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if event == "start":
            total = sum(data["videos"].values())
            self.overall = self.progress.add_task(f"job {data['job']}", total=total, fps=0.0)
            for key, frames in data["videos"].items():
                self.tasks[key] = self.progress.add_task(f"  {key}", total=frames, fps=0.0)
        elif event == "shard_done" and self.overall is not None:
            for task_id in (self.overall, self.tasks.get(data["video"])):
                if task_id is None:
                    continue
                self.progress.advance(task_id, data["frames"])
                task = self.progress.tasks[task_id]
                elapsed = task.elapsed or 0.0
                self.progress.update(task_id, fps=task.completed / elapsed if elapsed > 0 else 0.0)
        elif event == "video_failed" and data.get("video") in self.tasks:
            self.progress.update(self.tasks[data["video"]], description=f"  {data['video']} [red]failed")
