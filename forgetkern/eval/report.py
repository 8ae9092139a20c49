"""``ForgettingReport``: what each run learned on the task and lost in general, as JSON, markdown and a plot.

Each row is one training run (a method, a learning rate, a number of steps, a seed) with metrics measured before
and after on the task set and on the general sets. ``task_gain`` is the relative fall of task perplexity
(positive = learned), ``general_drop`` the relative rise of general perplexity (positive = forgot), and
``mc_drop`` the relative fall of general multiple-choice accuracy.

The report judges forgetting by ONE primary general metric, ``general=`` (``"general_ppl"`` or
``"general_mc"``): perplexity of generic text is a blunt probe of what an instruct model loses (it can fall while
the model's answers get worse), so when a multiple-choice score is measured it should be the primary one.
:meth:`drop` is a run's relative loss on that metric, :meth:`flagged` lists the runs whose drop exceeds
``threshold`` (default 5%, the seeds' stopping rule), and the plot's vertical axis is that drop.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Dict, List, Optional, Sequence

from forgetkern.eval.metrics import relative_drop


GENERAL_METRICS = ("general_ppl", "general_mc")
_LABELS = {"general_ppl": "relative rise of general perplexity", "general_mc": "relative fall of general MC accuracy"}


def _higher_is_better(metric: str) -> bool:
    return metric.endswith(("_mc", "_acc"))


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

    def drop(self, metric: str) -> float:
        """Relative loss on ``metric`` (a key of ``before``/``after``; accuracies, keys ending ``_mc`` or
        ``_acc``, are higher-is-better). Positive = forgot."""
        if metric not in self.before or metric not in self.after:
            raise KeyError(f"Run.drop: metric {metric!r} was not measured for {self.method} lr={self.lr:g} "
                           f"steps={self.steps} seed={self.seed} (measured: {sorted(self.after)})")
        return relative_drop(self.before[metric], self.after[metric], higher_is_better=_higher_is_better(metric))

    def as_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d.update(task_gain=self.task_gain, general_drop=self.general_drop, mc_drop=self.mc_drop)
        return d


class ForgettingReport:
    def __init__(self, runs: Sequence[Run] = (), *, threshold: float = 0.05, general: str = "general_ppl",
                 meta: Optional[Dict] = None):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"ForgettingReport: threshold must be in (0, 1), got {threshold!r}")
        if general not in GENERAL_METRICS:
            raise ValueError(f"ForgettingReport: general must be one of {GENERAL_METRICS}, got {general!r}")
        self.runs: List[Run] = []
        self.threshold = threshold
        self.general = general
        self.meta = dict(meta or {})
        for r in runs:
            self.add(r)

    def add(self, run: Run) -> None:
        run.drop(self.general)  # refuses a run that did not measure the primary metric, naming it
        self.runs.append(run)

    def drop(self, run: Run) -> float:
        """``run``'s relative loss on the report's primary general metric."""
        return run.drop(self.general)

    def flagged(self) -> List[Run]:
        return [r for r in self.runs if self.drop(r) > self.threshold]

    def summary(self) -> List[Dict]:
        """One row per (method, lr, steps, ``extra["alpha"]`` if any, e.g. a WiSE-FT interpolation): mean and
        spread (min, max) over seeds of ``task_gain``,
        ``general_drop`` (perplexity), ``mc_drop`` and ``drop`` (the primary metric's)."""
        groups: Dict[tuple, List[Run]] = {}
        for r in self.runs:
            groups.setdefault((r.method, r.lr, r.steps, r.extra.get("alpha")), []).append(r)
        rows = []
        for (method, lr, steps, alpha), rs in groups.items():
            row = {"method": method, "lr": lr, "steps": steps, "seeds": len(rs)}
            if alpha is not None:
                row["alpha"] = alpha
            for key in ("task_gain", "general_drop", "mc_drop", "drop"):
                vals = [self.drop(r) if key == "drop" else getattr(r, key) for r in rs]
                vals = [v for v in vals if v is not None]
                if vals:
                    row[key] = sum(vals) / len(vals)
                    row[key + "_min"], row[key + "_max"] = min(vals), max(vals)
            rows.append(row)
        return rows

    # ---- output ------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"threshold": self.threshold, "general": self.general, "meta": self.meta,
                           "runs": [r.as_dict() for r in self.runs], "summary": self.summary()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ForgettingReport":
        d = json.loads(text)
        runs = [Run(**{k: r[k] for k in ("method", "seed", "lr", "steps", "before", "after", "extra")})
                for r in d["runs"]]
        return cls(runs, threshold=d["threshold"], general=d.get("general", "general_ppl"), meta=d.get("meta"))

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
            flag = "FORGOT > {:.0f}%".format(100 * self.threshold) if row["drop"] > self.threshold else ""
            name = row["method"] + (f" a={row['alpha']:g}" if "alpha" in row else "")
            lines.append(f"| {name} | {row['lr']:g} | {row['steps']} | {row['seeds']} | {pct('task_gain')} "
                         f"| {pct('general_drop')} | {pct('mc_drop')} | {flag} |")
        return "\n".join(lines)

    def plot(self, path, *, title: str = "Task gain vs general drop") -> pathlib.Path:
        """The trade-off plot: task gain (x) against the primary general drop (y). Every (method, lr) is a curve
        through its step checkpoints from the origin (the model before training): the mean over seeds, with
        bars from the lowest to the highest seed and each seed's point faint behind it. The naive curves - one
        per learning rate - are the frontier tuning alone reaches; a mitigation must lie below it. Needs
        matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("ForgettingReport.plot needs matplotlib: pip install matplotlib "
                              "(or pip install 'forgetkern[demo]')") from e
        path = pathlib.Path(path)
        fig, ax = plt.subplots(figsize=(8, 5.5))
        methods = sorted({r.method for r in self.runs}, key=lambda m: (m != "naive", m))
        markers = "o^sDvP*XhH<>"
        rows = self.summary()
        for k, m in enumerate(methods):
            color = "grey" if m == "naive" else f"C{k % 10}"
            raw = [r for r in self.runs if r.method == m]
            ax.scatter([100 * r.task_gain for r in raw], [100 * self.drop(r) for r in raw], color=color,
                       marker=markers[k % len(markers)], alpha=0.2, s=14)
            for j, lr in enumerate(sorted({r["lr"] for r in rows if r["method"] == m})):
                pts = sorted((r for r in rows if r["method"] == m and r["lr"] == lr),
                             key=lambda r: (r["steps"], r.get("alpha", 1.0)))
                x = [0.0] + [100 * r["task_gain"] for r in pts]
                y = [0.0] + [100 * r["drop"] for r in pts]
                ax.plot(x, y, color=color, lw=1.0, alpha=0.7, ls="-" if m != "naive" else (":", "--", "-.")[j % 3])
                yerr = [[0.0] + [100 * (r["drop"] - r["drop_min"]) for r in pts],
                        [0.0] + [100 * (r["drop_max"] - r["drop"]) for r in pts]]
                label = f"naive lr={lr:g}" if m == "naive" else (m if j == 0 else None)
                ax.errorbar(x[1:], y[1:], yerr=[e[1:] for e in yerr], fmt=markers[k % len(markers)], color=color,
                            ms=6, capsize=2, lw=0.8, label=label)
        ax.axhline(100 * self.threshold, color="red", ls="--", lw=0.8, label=f"{100 * self.threshold:.0f}% threshold")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel("task gain (relative fall of task perplexity, %)")
        ax.set_ylabel(f"general drop ({_LABELS[self.general]}, %)")
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2)
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
