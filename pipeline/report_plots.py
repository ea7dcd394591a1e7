"""The PNGs of `pipeline report`: matplotlib's object API only (no pyplot, no GUI backend).

Each function draws one file. Legends sit outside the axes, so they never cover a curve;
each panel uses as few series as it needs, each in its own colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.froc import LUNA16_FPS

# Validation keys by panel; anything else in an eval record (counts, the threshold, loss,
# bad records) is not a metric of quality and stays off these axes.
RANKING = ("val/auroc", "val/ap")
OPERATING = (
    "val/sensitivity",
    "val/specificity",
    "val/precision",
    "val/f1",
    "val/accuracy",
    "val/sens_at_fpr_1pct",
    "val/sens_at_fpr_5pct",
    "val/sens_at_fpr_10pct",
)
FROC_KEYS = ("val/cpm", "val/cpm_candidate")
Series = dict[str, tuple[np.ndarray, np.ndarray]]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _resumes(ax, resumes: list[int]) -> None:
    for step in resumes:
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)


def _marker(steps: np.ndarray) -> str | None:
    return "o" if len(steps) < 30 else None


def loss_plot(out: Path, train: Series, val: Series, resumes: list[int]) -> Path:
    """Training loss (thin, every logged step) with validation loss (bold, per eval)."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for label, (steps, values) in train.items():
        ax.plot(steps, values, label=label, color="tab:blue", linewidth=1, alpha=0.8)
    for label, (steps, values) in val.items():
        ax.plot(steps, values, label=label, color="tab:orange", linewidth=2, marker="o", ms=4)
    _resumes(ax, resumes)
    values = [v for _, v in [*train.values(), *val.values()]]
    # Log only when the loss spans decades: over a small range log ticks are unreadable.
    if values and all((v > 0).all() for v in values):
        everything = np.concatenate(values)
        if everything.max() / everything.min() > 20:
            ax.set_yscale("log")
    title = "Loss" + (" (dotted: resumed)" if resumes else "")
    if not val:
        title += " (no val/loss logged)"
    ax.set(title=title, xlabel="optimizer step", ylabel="loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.savefig(out, dpi=100)
    return out


def lr_plot(out: Path, lr: tuple[np.ndarray, np.ndarray], resumes: list[int]) -> Path:
    fig = _figure(7, 3.5)
    ax = fig.add_subplot()
    ax.plot(*lr, color="tab:green")
    _resumes(ax, resumes)
    ax.set(title="Learning rate", xlabel="optimizer step", ylabel="lr")
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=100)
    return out


def val_metrics_plot(out: Path, series: Series, resumes: list[int]) -> Path | None:
    """Three panels: ranking (AUROC, AP), operating point, FROC (CPM and its rates).

    None (no file) when the series hold none of these metrics.
    """
    import matplotlib

    froc_rates = sorted(
        (k for k in series if k.startswith(("val/froc_", "val/froc_candidate_"))),
        key=lambda k: float(k.rsplit("_", 1)[1]),
    )
    panels = [
        ("Ranking", [k for k in RANKING if k in series], "tab10"),
        ("Operating point (threshold 0.5; sensitivity at FPR)", [k for k in OPERATING if k in series], "tab10"),
        ("FROC: CPM and sensitivity at FP/scan", [k for k in FROC_KEYS if k in series] + froc_rates, None),
    ]  # fmt: skip
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig = _figure(8, 2.6 * len(panels) + 0.8)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    rate_colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, max(len(froc_rates), 1)))
    for ax, (title, keys, cmap) in zip(axes, panels, strict=True):
        colours = matplotlib.colormaps[cmap].colors if cmap else None
        for i, key in enumerate(keys):
            steps, values = series[key]
            style = {"marker": _marker(steps), "markersize": 3}
            if colours is not None:
                style["color"] = colours[i % len(colours)]
            elif key in FROC_KEYS:
                style.update(color="black" if key == "val/cpm" else "tab:red", linewidth=2.2)
            else:
                style.update(color=rate_colours[froc_rates.index(key)], linewidth=1)
            ax.plot(steps, values, label=key.removeprefix("val/"), **style)
        _resumes(ax, resumes)
        ax.set_title(title, fontsize="medium", loc="left")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axes[-1].set_xlabel("optimizer step" + (" (dotted: resumed)" if resumes else ""))
    fig.suptitle("Validation metrics")
    fig.savefig(out, dpi=100)
    return out


def roc_plot(out: Path, fpr: np.ndarray, tpr: np.ndarray, auroc: float, negatives: int, when: str):
    """ROC with a log FPR axis: the low-FPR end, where a 1:600 problem lives, gets room."""
    fig = _figure(5.5, 4.5)
    ax = fig.add_subplot()
    low = 1.0 / max(negatives, 1)
    # FPR 0 has no place on a log axis: those points sit on the left edge instead.
    ax.plot(np.maximum(fpr, low / 2), tpr, color="tab:blue", label=f"AUROC {auroc:.4f}")
    grid = np.geomspace(low, 1, 100)
    ax.plot(grid, grid, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlim(low / 2, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set(
        title=f"ROC, {when}",
        xlabel="false positive rate (log; left edge: FPR 0)",
        ylabel="true positive rate",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(out, dpi=100)
    return out


def froc_plot(out: Path, record: dict, title: str, metric: str = "CPM") -> Path:
    """FROC on a log FP/scan axis (1/8..8, as the challenge draws it), CI band, 7 rates marked."""
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    fps, sens = np.asarray(record["fps"]), np.asarray(record["sensitivity"])
    band = record["band"]
    low = np.array([np.nan if v is None else v for v in band["low"]], dtype=float)
    high = np.array([np.nan if v is None else v for v in band["high"]], dtype=float)
    summary = record["summary"]
    ci = summary.get("ci", {}).get("cpm")
    if np.isfinite(low).any():
        ax.fill_between(band["fps"], low, high, color="tab:blue", alpha=0.2, label="95% CI")
    # The curve is drawn as the straight segments the sensitivities are interpolated on.
    ax.plot(np.clip(fps, 1e-3, None), sens, color="tab:blue", linewidth=1.8, label="FROC")
    if fps[-1] < 8:  # past the last mark the sensitivity stays where it ended
        ax.plot([max(fps[-1], 1e-3), 8 * 1.3], [sens[-1]] * 2, color="tab:blue",
                linestyle="--", linewidth=1, label="beyond the last mark")  # fmt: skip
    rates = record.get("rates", list(LUNA16_FPS))
    at = [summary.get(f"froc_{r:g}") for r in rates]
    ax.plot(rates, at, "o", color="tab:red", label="sensitivity at the 7 rates", zorder=3)
    for r, v in zip(rates, at, strict=True):
        if v is not None:
            ax.annotate(f"{v:.2f}", (r, v), textcoords="offset points", xytext=(0, -14),
                        ha="center", fontsize="x-small", color="tab:red")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / 8 / 1.3, 8 * 1.3)
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set_ylim(-0.02, 1.02)
    cpm = summary.get("cpm")
    head = f"{metric} {cpm:.3f}" if cpm is not None else f"{metric} n/a"
    if ci:
        head += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
    ax.set(title=f"{title}\n{head}", xlabel="false positives per scan", ylabel="sensitivity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(out, dpi=100)
    return out
