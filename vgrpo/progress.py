"""The console's view of a run: a live panel on a terminal, one line per step in a log (``Progress``)."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("vgrpo")


def role_rates(row: dict[str, Any]) -> dict[str, float]:
    """images/s per role for one metrics row: the step's images over the seconds each role spent on them
    (rollout = sampling compute, reward = scoring, learner = the update). The smallest is the bottleneck."""
    n_images = row["images_per_s"] * row["time/step"]
    keys = {"rollout": "time/sample_compute", "reward": "time/reward", "learner": "time/learner"}
    return {role: n_images / row[k] for role, k in keys.items() if row.get(k, 0) > 0}


class Progress:
    """Progress of the loop. On a terminal: a rich live panel (bar, then step, reward, images/s per role,
    staleness and phase times of the last step); otherwise one plain line per step, for log files."""

    def __init__(self, mode: str, total: int, start: int):
        self.live = mode == "rich" or (mode == "auto" and sys.stderr.isatty())
        self.off = mode == "off"
        self.total = total
        self._bar: Any = None
        self._live: Any = None
        if self.live and not self.off:
            from rich.console import Console, Group
            from rich.live import Live
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._group = Group
            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="starting the roles")
            self._live = Live(self._bar, console=Console(stderr=True), refresh_per_second=4, transient=False)
            self._live.start()

    def update(self, row: dict[str, Any]) -> None:
        rates = role_rates(row)
        per_role = " · ".join(f"{k} {v:.1f}" for k, v in rates.items())
        bottleneck = min(rates, key=lambda k: rates[k]) if rates else "?"
        info = (
            f"reward {row['reward_mean']:.3f} ± {row['reward_std']:.3f} | loss {row['loss']:+.4f} | "
            f"{row['images_per_s']:.1f} img/s ({per_role}) | stale {row['staleness']}"
        )
        if "eval/overall" in row:
            info += f" | eval {row['eval/overall']:.3f}"
        if self.off:
            return
        if self._live is None:
            print(f"step {row['step']}/{self.total} | {info} | {row['time/step']:.1f} s", flush=True)
            return
        from rich.text import Text

        # short lines (< 80 columns): a narrow terminal must not wrap the panel into noise
        role_cells = "  ".join(
            f"{k} [bold]{v:.1f}[/]" + (" [yellow](slowest)[/]" if k == bottleneck else "")
            for k, v in rates.items()
        )
        phases = " · ".join(
            f"{k[5:]} {row[k]:.2f}s"
            for k in ("time/rollout", "time/reward", "time/learner", "time/weight_sync")
        )
        lines = [
            f"  reward [bold green]{row['reward_mean']:.3f}[/] ± {row['reward_std']:.3f}   loss {row['loss']:+.4f}"
            f"   staleness [bold]{row['staleness']}[/]   {row['time/step']:.2f} s/step"
            + (f"   eval [bold]{row['eval/overall']:.3f}[/]" if "eval/overall" in row else ""),
            f"  images/s  e2e [bold]{row['images_per_s']:.1f}[/]  {role_cells}",
            f"  phases    {phases}",
        ]
        self._bar.update(self._task, completed=row["step"], info="")
        self._live.update(self._group(self._bar, *(Text.from_markup(line) for line in lines)))

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
