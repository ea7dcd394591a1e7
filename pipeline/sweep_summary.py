"""`pipeline sweep --summary DIR`: the points of a sweep ranked by their best metric.

Reads SWEEP_DIR/sweep.json and each point's metrics.jsonl (the local record every run
writes, whatever the W&B mode), so it works offline, while points still run, and after
preempted points resumed. A point that failed, is still running or never started is named
as such and kept out of the ranking, never averaged in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.report import continuous, read_metrics
from pipeline.sweep import finished, read_plan


def point_status(run_dir: Path) -> str:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return "not started"
    if finished(run_dir):
        return "finished"
    ends = [r for r in read_metrics(metrics) if r["event"] == "end"]
    return "stopped (resumable)" if ends and ends[-1].get("stopped") else "running or failed"


def summarize(out: Path) -> dict[str, Any]:
    """Ranked rows: best value of the sweep's metric per point, its step, status, params."""
    plan = read_plan(out)
    metric, maximize = plan["metric"], plan["goal"] == "maximize"
    rows = []
    for point in plan["points"]:
        run_dir = out / point["name"]
        status = point_status(run_dir)
        evals = []
        if (run_dir / "metrics.jsonl").is_file():
            evals = [
                r
                for r in continuous(read_metrics(run_dir / "metrics.jsonl"))
                if r["event"] == "eval" and isinstance(r.get(metric), (int, float))
            ]
        best = (max if maximize else min)(evals, key=lambda r: r[metric]) if evals else None
        rows.append(
            {
                "name": point["name"],
                "status": status,
                "params": point["params"],
                "best": None if best is None else best[metric],
                "best_step": None if best is None else int(best["step"]),
                "curve": [(int(r["step"]), r[metric]) for r in evals],
            }
        )
    done = [r for r in rows if r["status"] == "finished" and r["best"] is not None]
    done.sort(key=lambda r: r["best"], reverse=maximize)
    for rank, row in enumerate(done, start=1):
        row["rank"] = rank
    others = [r for r in rows if r not in done]
    return {"metric": metric, "goal": plan["goal"], "ranked": done, "not_ranked": others}


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table: rank, point, best metric @ step, the parameters that differ."""
    rows = summary["ranked"] + summary["not_ranked"]
    varying = _varying(rows)
    header = ["rank", "point", summary["metric"], "step", "status", *varying]
    lines = [header]
    for row in rows:
        best = "-" if row["best"] is None else f"{row['best']:.4f}"
        step = "-" if row["best_step"] is None else str(row["best_step"])
        values = [_short(row["params"].get(k)) for k in varying]
        lines.append([str(row.get("rank", "-")), row["name"], best, step, row["status"], *values])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def _varying(rows: list[dict[str, Any]]) -> list[str]:
    """The parameters whose values differ between points (all of them if none differ)."""
    keys = sorted({k for r in rows for k in r["params"]})
    return [k for k in keys if len({json.dumps(r["params"].get(k)) for r in rows}) > 1] or keys


def _short(value: Any) -> str:
    return (
        f"{value:.4g}"
        if isinstance(value, float)
        else json.dumps(value)
        if isinstance(value, (list, dict))
        else str(value)
    )


def plot(summary: dict[str, Any], path: Path) -> None:
    """The metric over steps for every point, ranked points first, best marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["ranked"] + summary["not_ranked"]
    varying = _varying(rows)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    colors = plt.get_cmap("tab10").colors
    for i, row in enumerate(rows):
        if not row["curve"]:
            continue
        steps, values = zip(*row["curve"], strict=True)
        params = " ".join(f"{k.rsplit('.', 1)[-1]}={_short(row['params'].get(k))}" for k in varying)
        where = f"#{row['rank']}" if "rank" in row else f"({row['status']})"
        label = f"{where} {row['name']}  {params}"
        style = "-" if "rank" in row else ":"
        ax.plot(steps, values, style, color=colors[i % len(colors)], marker="o", ms=3, label=label)
        if row["best_step"] is not None:
            ax.plot([row["best_step"]], [row["best"]], "*", color=colors[i % len(colors)], ms=11)
    ax.set_xlabel("step")
    ax.set_ylabel(summary["metric"])
    ax.set_title(f"sweep: {summary['metric']} ({summary['goal']}), * = best of each point")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(out: Path) -> dict[str, Any]:
    """summary.json and summary.png into the sweep dir; returns the summary."""
    summary = summarize(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot(summary, out / "summary.png")
    return summary
