"""``ForgettingReport``: what each run learned on the task and lost in general, as JSON, markdown and a plot.

Each row is one training run (a method, a learning rate, a number of steps, a seed) with metrics measured before
and after on the task set and on the general sets. ``task_gain`` is the relative fall of task perplexity
(positive = learned), ``general_drop`` the relative rise of general perplexity (positive = forgot), and
``mc_drop`` the relative fall of general multiple-choice accuracy. :meth:`flagged` lists the runs whose general
drop exceeds ``threshold`` (default 5%, the seeds' stopping rule).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Dict, List, Optional, Sequence

from forgetkern.eval.metrics import relative_drop


@dataclasses.dataclass
class Run:
    method: str
    seed: int
    lr: float
    steps: int
    before: Dict[str, float]
    after: Dict[str, float]
    extra: Dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def task_gain(self) -> float:
        return -relative_drop(self.before["task_ppl"], self.after["task_ppl"])

    @property
    def general_drop(self) -> float:
        return relative_drop(self.before["general_ppl"], self.after["general_ppl"])

    @property
    def mc_drop(self) -> Optional[float]:
        if "general_mc" not in self.before:
            return None
        return relative_drop(self.before["general_mc"], self.after["general_mc"], higher_is_better=True)

    def as_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d.update(task_gain=self.task_gain, general_drop=self.general_drop, mc_drop=self.mc_drop)
        return d


class ForgettingReport:
    def __init__(self, runs: Sequence[Run] = (), *, threshold: float = 0.05, meta: Optional[Dict] = None):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"ForgettingReport: threshold must be in (0, 1), got {threshold!r}")
        self.runs: List[Run] = list(runs)
        self.threshold = threshold
        self.meta = dict(meta or {})

    def add(self, run: Run) -> None:
        self.runs.append(run)

    def flagged(self) -> List[Run]:
        return [r for r in self.runs if r.general_drop > self.threshold]

    def summary(self) -> List[Dict]:
        """One row per (method, lr, steps): mean and spread (min, max) over seeds."""
        groups: Dict[tuple, List[Run]] = {}
        for r in self.runs:
            groups.setdefault((r.method, r.lr, r.steps), []).append(r)
        rows = []
        for (method, lr, steps), rs in groups.items():
            row = {"method": method, "lr": lr, "steps": steps, "seeds": len(rs)}
            for key in ("task_gain", "general_drop", "mc_drop"):
                vals = [getattr(r, key) for r in rs if getattr(r, key) is not None]
                if vals:
                    row[key] = sum(vals) / len(vals)
                    row[key + "_min"], row[key + "_max"] = min(vals), max(vals)
            rows.append(row)
        return rows

    # ---- output ------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"threshold": self.threshold, "meta": self.meta,
                           "runs": [r.as_dict() for r in self.runs], "summary": self.summary()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ForgettingReport":
        d = json.loads(text)
        runs = [Run(**{k: r[k] for k in ("method", "seed", "lr", "steps", "before", "after", "extra")})
                for r in d["runs"]]
        return cls(runs, threshold=d["threshold"], meta=d.get("meta"))

    def to_markdown(self) -> str:
        lines = ["| method | lr | steps | seeds | task gain | general ppl drop | general MC drop | flag |",
                 "|---|---:|---:|---:|---:|---:|---:|---|"]
        for row in self.summary():
            def pct(k):
                if k not in row:
                    return "n/a"
                s = f"{100 * row[k]:+.1f}%"
                if row["seeds"] > 1:
                    s += f" [{100 * row[k + '_min']:+.1f}, {100 * row[k + '_max']:+.1f}]"
                return s
            flag = "FORGOT > {:.0f}%".format(100 * self.threshold) if row["general_drop"] > self.threshold else ""
            lines.append(f"| {row['method']} | {row['lr']:g} | {row['steps']} | {row['seeds']} | {pct('task_gain')} "
                         f"| {pct('general_drop')} | {pct('mc_drop')} | {flag} |")
        return "\n".join(lines)

    def plot(self, path, *, title: str = "Task gain vs general drop") -> pathlib.Path:
        """The trade-off plot: task gain (x) against general perplexity drop (y), one marker per run, the
        tuning-only naive runs joined as the frontier a mitigation must beat. Needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("ForgettingReport.plot needs matplotlib: pip install matplotlib "
                              "(or pip install 'forgetkern[demo]')") from e
        path = pathlib.Path(path)
        fig, ax = plt.subplots(figsize=(7, 5))
        methods = sorted({r.method for r in self.runs}, key=lambda m: (m != "naive", m))
        markers = "o^sDvP*XhH<>"
        for k, m in enumerate(methods):
            rs = [r for r in self.runs if r.method == m]
            ax.scatter([100 * r.task_gain for r in rs], [100 * r.general_drop for r in rs], label=m,
                       marker=markers[k % len(markers)], alpha=0.75)
            if m == "naive":
                pts = sorted((100 * r.task_gain, 100 * r.general_drop) for r in rs)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color="grey", lw=0.8, alpha=0.6)
        ax.axhline(100 * self.threshold, color="red", ls="--", lw=0.8, label=f"{100 * self.threshold:.0f}% threshold")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel("task gain (relative fall of task perplexity, %)")
        ax.set_ylabel("general drop (relative rise of general perplexity, %)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def save(self, directory, *, plot: bool = True) -> Dict[str, pathlib.Path]:
        """Write ``report.json``, ``report.md`` and (if matplotlib is installed and ``plot``) ``tradeoff.png``."""
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        out = {"json": d / "report.json", "markdown": d / "report.md"}
        out["json"].write_text(self.to_json())
        out["markdown"].write_text(self.to_markdown() + "\n")
        if plot:
            try:
                out["plot"] = self.plot(d / "tradeoff.png")
            except ImportError:
                pass
        return out
