"""The W&B sink of the Tracker: the only module that imports wandb, and only on rank 0.

wandb is imported inside functions, so `wandb.mode=disabled` never loads it, starts its
service, or creates a `wandb/` directory. Nothing here may stop training: a failed online
start or a failed log call costs one warning line and the run goes on with local logging
(metrics.jsonl and the console are the Tracker's other sinks). Which run to log to (env
overrides, the id kept across resumes) is decided in `wandb_identity` before wandb starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import WandbConfig
from pipeline.data.remote import path_of, scrub_arg, scrub_tree
from pipeline.errors import ConfigError
from pipeline.tracking import artifacts, curves
from pipeline.tracking.wandb_identity import (
    plan_run,
    read_run_file,
    record_segment,
    resolve_target,
)

log = logging.getLogger(__name__)

FINISH_TIMEOUT_S = 60.0
"""Seconds `finish()` waits for uploads before giving up (the run is then marked crashed)."""
_MAX_ALERTS = 20


def _one_line(exc: BaseException) -> str:
    """First line of an exception, with any API key blanked (wandb errors can echo settings)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    key = os.environ.get("WANDB_API_KEY")
    if key:
        text = text.replace(key, "***")
    return f"{type(exc).__name__}: {text}"


class WandbSink:
    """Forwards the Tracker's events to one W&B run. Construct on rank 0 only."""

    def __init__(
        self,
        cfg: WandbConfig,
        run_dir: Path,
        config: dict,
        system: dict,
        resumed_from_step: int | None,
    ) -> None:
        self._run: Any = None
        self._min_step = 0
        self._alerts: list[str] = []
        self.target = resolve_target(cfg, run_dir)
        if self.target.mode == "disabled":
            return
        import wandb

        # Silent from the start: a non-silent login looks up the user name over the network
        # (seconds of retries, unbounded by init_timeout) just to print a greeting.
        wandb.setup(settings=wandb.Settings(silent=True))
        if self.target.mode == "online" and not wandb.login(prompt=False, verify=False):
            # Without credentials wandb.init would prompt on a TTY and wait forever.
            raise RuntimeError("no W&B credentials (run `wandb login` or set WANDB_API_KEY)")
        plan = plan_run(self.target, run_dir, resumed_from_step)
        run_config = {**config, "system": system}
        notes = self.target.notes
        if plan.resume_of is not None:
            run_config.update(resume_of=plan.resume_of, resumed_from_step=resumed_from_step)
            piece = (
                f"resume_of={plan.resume_of} resumed_from_step={resumed_from_step}"
                if resumed_from_step is not None
                else f"resume_of={plan.resume_of} (restarted from step 0)"
            )
            notes = f"{notes}\n{piece}" if notes else piece
        self.target.dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            init_timeout=cfg.init_timeout,
            finish_timeout=FINISH_TIMEOUT_S,
            console="off",  # our console sink already prints; no duplicated output.log
            silent=True,  # we print our own single status/warning line
            disable_code=True,
            save_code=False,
            disable_git=True,  # the git commit is in config["system"] already
            x_save_requirements=False,
        )
        with _argv_scrubbed():  # W&B records sys.argv, and overrides may hold credentials
            self._run = wandb.init(
                project=self.target.project,
                entity=self.target.entity,
                group=plan.group,
                name=plan.name,
                tags=self.target.tags or None,
                notes=notes,
                id=plan.id,
                resume=plan.resume,
                dir=str(self.target.dir),
                mode=self.target.mode,
                config=scrub_tree(run_config),  # no user:password@ or signed URLs in W&B
                settings=settings,
            )
        # A resumed online run already holds steps up to where the previous segment died;
        # wandb drops anything below its next step (warning on every call), so skip those
        # quietly: after a resume from an earlier checkpoint the W&B curve has a flat gap.
        self._min_step = int(self._run.starting_step or 0) if self._run.resumed else 0
        record_segment(run_dir, plan, self.target.mode, resumed_from_step)
        # One model collection for the whole run directory: resumed segments (new W&B ids
        # offline) keep adding versions to the collection the first segment started.
        first_id = (read_run_file(run_dir) or {}).get("id") or plan.id
        self.model_collection = f"model-{first_id}"
        self._logged: dict[str, set[str]] = {}  # file digest -> aliases already logged
        where = self._run.dir.rsplit("/files", 1)[0] if self._run.dir else self.target.dir
        if self.target.mode == "offline":
            log.info(
                "wandb: offline run %s in %s (upload later: wandb sync %s)", plan.id, where, where
            )
        else:
            log.info("wandb: run %s%s", plan.id, f" {self._run.url}" if self._run.url else "")

    @property
    def active(self) -> bool:
        return self._run is not None

    def _give_up(self, what: str, exc: BaseException) -> None:
        log.warning(
            "wandb: %s failed (%s); continuing with local logging only", what, _one_line(exc)
        )
        self._run = None

    def log(self, step: int, values: dict[str, float | int]) -> None:
        if self._run is None or step < self._min_step:
            return
        try:
            self._run.log(dict(values), step=step)
        except Exception as exc:  # never let tracking stop training
            self._give_up("log", exc)

    def log_curves(
        self, step: int, labels: np.ndarray, probs: np.ndarray, groups: list[str] | None = None
    ) -> None:
        """ROC, PR, per-class probability histogram and (with scan ids) the FROC with its band."""
        if self._run is None or step < self._min_step or len(labels) == 0:
            return
        try:
            points = curves.curve_points(labels, probs)
            froc = None
            if groups is not None and 0 < int(np.sum(labels)) < len(labels):
                froc = curves.froc_points(labels, probs, groups)
        except ValueError as exc:  # NaN probabilities: no curves this time, W&B stays on
            log.warning("wandb: no ROC/PR plots at step %d (%s)", step, exc)
            return
        try:
            plots = _plots(points)
            if froc is not None:
                plots["val/froc_curve"] = _froc_plot(froc)
            self._run.log(plots, step=step)
        except Exception as exc:
            self._give_up("log_curves", exc)

    def declare_data(self, splits: dict[str, list[str]]) -> None:
        """Each split's shards as a dataset artifact of references: lineage, no upload.

        Online the run *uses* the artifact (W&B draws data -> run -> model). Offline runs
        cannot declare inputs (wandb refuses `use_artifact` offline), so there the run
        logs the same artifact as an output; `wandb sync` uploads it with the run.
        """
        if self._run is None:
            return
        try:
            import wandb

            for split, shards in splits.items():
                if not shards:
                    continue
                meta = artifacts.dataset_metadata(split, shards)
                art = wandb.Artifact(
                    f"data-{split}-{meta['digest']}", type="dataset", metadata=meta
                )
                for shard in shards:
                    uri = artifacts.reference_uri(shard)
                    # checksum=False: W&B must neither read nor list the shards.
                    name = path_of(uri).rsplit("/", 1)[-1]
                    art.add_reference(uri, name=name, checksum=False)
                if self.target.mode == "online":
                    self._run.use_artifact(art)
                else:
                    self._run.log_artifact(art)
        except Exception as exc:
            self._give_up("declare_data", exc)

    def log_model(self, path: Path, aliases: list[str], metadata: dict[str, Any]) -> None:
        """One checkpoint file as a version of this run's model collection.

        A file whose bytes were already logged with these aliases (last.pt unchanged since
        the last save) is skipped. Same bytes with new aliases (last.pt equal to best.pt at
        the end) are logged again: W&B then adds the aliases to the existing version and
        uploads nothing, because it stores files by content digest.
        """
        if self._run is None:
            return
        try:
            digest = artifacts.file_digest(path)
            if set(aliases) <= self._logged.get(digest, set()):
                return
            import wandb

            art = wandb.Artifact(self.model_collection, type="model", metadata=metadata)
            art.add_file(str(path), name=path.name)  # copied to staging: path may change
            self._run.log_artifact(art, aliases=aliases)
            self._logged.setdefault(digest, set()).update(aliases)
        except Exception as exc:
            self._give_up("log_model", exc)

    def alert(self, message: str) -> None:
        """A W&B alert online; offline, a summary entry (an offline alert would fire at sync)."""
        if self._run is None:
            return
        try:
            self._alerts = (self._alerts + [message])[-_MAX_ALERTS:]
            self._run.summary["alerts"] = list(self._alerts)
            self._run.summary["last_alert"] = message
            if self.target.mode == "online":
                import wandb

                self._run.alert(title="pipeline warning", text=message, level=wandb.AlertLevel.WARN)
        except Exception as exc:
            self._give_up("alert", exc)

    def finish(self) -> None:
        """Close the run; waits at most about FINISH_TIMEOUT_S, whatever the network does."""
        run, self._run = self._run, None
        if run is None:
            return
        errors: list[BaseException] = []

        def close() -> None:
            try:
                run.finish()
            except BaseException as exc:  # noqa: BLE001 - reported below, never raised
                errors.append(exc)

        # finish_timeout bounds uploads; the thread also bounds anything else that stalls.
        closer = threading.Thread(target=close, name="wandb-finish", daemon=True)
        closer.start()
        closer.join(FINISH_TIMEOUT_S + 15)
        if closer.is_alive():
            log.warning(
                "wandb: finish did not return in %.0f s; leaving it behind", FINISH_TIMEOUT_S + 15
            )
        elif errors:
            log.warning("wandb: finish failed (%s)", _one_line(errors[0]))


@contextlib.contextmanager
def _argv_scrubbed() -> Iterator[None]:
    """`sys.argv` with every URL's credentials replaced by *** while W&B reads it."""
    saved = sys.argv
    sys.argv = [scrub_arg(arg) for arg in saved]
    try:
        yield
    finally:
        sys.argv = saved


def wandb_sink_or_none(
    cfg: WandbConfig,
    run_dir: Path,
    config: dict,
    system: dict,
    resumed_from_step: int | None,
) -> WandbSink | None:
    """The sink, or None when disabled or when W&B cannot start (one warning, training goes on).

    A bad WANDB_MODE value is a user error (ConfigError) and is raised.
    """
    if resolve_target(cfg, run_dir).mode == "disabled":
        return None
    try:
        return WandbSink(cfg, run_dir, config, system, resumed_from_step)
    except ConfigError:
        raise
    except Exception as exc:
        log.warning(
            "wandb: could not start W&B in %s mode (%s); continuing with local logging only",
            resolve_target(cfg, run_dir).mode,
            _one_line(exc),
        )
        _teardown()
        return None


def _teardown() -> None:
    # Stop wandb's background service after a failed init so no process lingers.
    try:
        import wandb

        wandb.teardown()
    except Exception:
        pass


def _plots(points: curves.CurvePoints) -> dict[str, Any]:
    """W&B custom line charts; one table each, a few hundred rows."""
    import wandb

    centres = (points.bin_edges[:-1] + points.bin_edges[1:]) / 2
    rows = [
        [cls, float(c), float(f)]
        for cls, frac in points.fractions.items()
        for c, f in zip(centres, frac, strict=True)
    ]
    hist = wandb.Table(columns=["class", "probability", "fraction"], data=rows)
    plots = {
        "val/prob_hist": wandb.plot.line(
            hist, "probability", "fraction", stroke="class", title="Predicted probability per class"
        )
    }
    if min(points.counts.values()) > 0:  # curves are undefined (NaN) with one class only
        roc = wandb.Table(columns=["fpr", "tpr"], data=np.c_[points.fpr, points.tpr].tolist())
        pr = wandb.Table(
            columns=["recall", "precision"], data=np.c_[points.recall, points.precision].tolist()
        )
        plots["val/roc_curve"] = wandb.plot.line(roc, "fpr", "tpr", title="ROC")
        plots["val/pr_curve"] = wandb.plot.line(pr, "recall", "precision", title="Precision-recall")
    return plots


def _froc_plot(points: curves.FrocPoints) -> Any:
    """FROC (per candidate) with its 95% bootstrap band, as three series over FP/scan."""
    import wandb

    return wandb.plot.line_series(
        xs=points.fps.tolist(),
        ys=[points.sensitivity.tolist(), points.low.tolist(), points.high.tolist()],
        keys=["sensitivity", "95% CI low", "95% CI high"],
        title=f"FROC per candidate (interpolated CPM {points.cpm:.3f})",
        xname="false positives per scan",
    )
