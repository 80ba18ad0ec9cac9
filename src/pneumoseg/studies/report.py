"""What a study shows: trial values in MLflow as it runs, plots (PNG + HTML), and the
``study show`` summary."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

from pneumoseg.tracking import Tracker

log = logging.getLogger("pneumoseg.studies")


class MlflowTrialLogger:
    """Optuna callback: each finished trial's value (and the running best) as MLflow metrics at
    step = trial number, in one batched call."""

    def __init__(self, tracker: Tracker, prefix: str = "") -> None:
        self.tracker = tracker
        self.prefix = prefix

    def __call__(self, study: Any, trial: Any) -> None:
        if trial.value is None:
            return
        metrics = {f"{self.prefix}trial_value": float(trial.value)}
        with contextlib.suppress(ValueError):  # no completed trial yet
            metrics[f"{self.prefix}best_value"] = float(study.best_value)
        self.tracker.log_metrics(metrics, step=trial.number)


def save_study_plots(
    study: Any, out_dir: Path, params: list[str] | None = None, html_dir: Path | None = None
) -> list[Path]:
    """The study's plots as PNG (matplotlib) in ``out_dir`` and self-contained HTML (plotly)
    in ``html_dir`` (default ``out_dir``; DVC renders only the PNGs of a plots folder):
    optimisation history, slices, parameter importances, parallel coordinates, the contour of
    the two most important parameters, the timeline (workers, failed and pruned trials) and
    the intermediate values (what the pruner saw). Plots that cannot be made are skipped with
    a log line (importances and contours need two completed trials and two parameters; a
    study whose trials report nothing has no intermediate values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    html_dir = html_dir or out_dir
    for folder in (out_dir, html_dir):
        folder.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    plots: dict[str, dict[str, Any]] = {
        "optimization_history": {},
        "slice": {"params": params},
        "param_importances": {"params": params},
        "parallel_coordinate": {"params": params},
        "timeline": {},
    }
    top = most_important(study, params)
    if len(top) == 2:
        plots["contour"] = {"params": top}
    if any(t.intermediate_values for t in trials):
        plots["intermediate_values"] = {}
    written: list[Path] = []
    with warnings.catch_warnings():  # matplotlib/optuna chatter about few or equal values
        warnings.simplefilter("ignore", UserWarning)
        for name, kwargs in plots.items():
            try:
                ax = getattr(vis_mpl, f"plot_{name}")(study, **kwargs)
                fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
                fig.set_size_inches(10, 5)
                fig.tight_layout()
                fig.savefig(out_dir / f"{name}.png", dpi=90)
                plt.close(fig)
                written.append(out_dir / f"{name}.png")
                getattr(vis, f"plot_{name}")(study, **kwargs).write_html(html_dir / f"{name}.html")
                written.append(html_dir / f"{name}.html")
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                log.info("study plot %s skipped: %s", name, exc)
    return written


def param_importances(study: Any, params: list[str] | None = None) -> dict[str, float]:
    """Optuna's importances of ``params`` (default: all), most important first; empty while
    the study cannot tell (fewer than two completed trials, one parameter)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            found = optuna.importance.get_param_importances(study, params=params)
        except (ValueError, RuntimeError, ZeroDivisionError):
            return {}
    return {k: float(v) for k, v in found.items()}


def most_important(study: Any, params: list[str] | None = None) -> list[str]:
    """The two parameters that matter most to the objective (fewer when unknown)."""
    return list(param_importances(study, params))[:2]


def study_summary(study: Any) -> dict[str, Any]:
    """``{"study", "direction", "trials": [{"number", "state", "value", "params"}], "best",
    "importances"}``."""

    trials = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "duration_s": t.duration.total_seconds() if t.duration else None,
        }
        for t in study.get_trials(deepcopy=False)
    ]
    best = None
    with contextlib.suppress(ValueError):
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params}
    importances = param_importances(study)
    return {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "metric": study.user_attrs.get("metric"),
        "trials": trials,
        "best": best,
        "importances": importances,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A terminal table of the trials, the best trial and the importances."""
    trials = summary["trials"]
    names = sorted({k for t in trials for k in t["params"]})
    out = io.StringIO()
    states: dict[str, int] = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(states.items()))
    out.write(
        f"study {summary['study']}: {len(trials)} trials ({counts or 'none'}); "
        f"{summary['direction']} {summary['metric']}\n"
    )
    header = ["#", "state", "value", *names]
    rows = [
        [
            str(t["number"]),
            t["state"],
            format_value(t["value"]),
            *(format_value(t["params"].get(n)) for n in names),
        ]
        for t in trials
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        out.write("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + "\n")
    best = summary["best"]
    if best:
        out.write(f"best: trial {best['number']} value {best['value']:.4f}\n")
        for k, v in best["params"].items():
            out.write(f"  {k}: {format_value(v)}\n")
    else:
        out.write("best: none yet (no completed trial)\n")
    if summary["importances"]:
        out.write("importances:\n")
        for k, v in summary["importances"].items():
            out.write(f"  {k}: {v:.3f}\n")
    return out.getvalue()


def format_value(v: Any) -> str:
    """A param or score for a table: 4 significant digits, "-" for None."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def best_values(study: Any, name: str) -> dict[str, Any]:
    try:
        return dict(study.best_trial.params)
    except ValueError:
        raise ValueError(f"study {name}: no completed trial yet") from None
