"""Regional cross-validation: one run per architecture, encoder and held-out region, and the table."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from rts_tf.config import load_config
from rts_tf.engine import ENGINES, failures_message, local_jobs
from rts_tf.errors import InputError
from rts_tf.records import read_manifest, write_text
from rts_tf.train import FitConfig


@dataclass
class CrossvalResult:
    logdir: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    trained: int = 0
    skipped: int = 0

    def markdown(self) -> str:
        columns = sorted({row["model"] for row in self.rows})
        regions = list(dict.fromkeys(row["region"] for row in self.rows))
        cells = {(row["region"], row["model"]): row for row in self.rows}
        lines = ["| held-out region | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
        for region in regions + ["mean"]:
            values = []
            for column in columns:
                chosen = [cells[(r, column)] for r in regions if (r, column) in cells] if region == "mean" \
                    else [cells[(region, column)]] if (region, column) in cells else []
                if not chosen:
                    values.append("")
                    continue
                mean = lambda key: sum(row[key] for row in chosen if row[key] is not None) / len(chosen)
                values.append(f"{mean('iou'):.3f} / {mean('paper_max_iou'):.3f} / {mean('f1'):.3f}")
            lines.append(f"| {region} | " + " | ".join(values) + " |")
        lines.append("")
        lines.append("Cells: transfer IoU on the held-out region's scenes (model and threshold chosen on "
                     "validation data from the training regions) / paper-style max IoU (the best per-epoch IoU "
                     "on the held-out region, as Nitze et al. 2021 report it) / transfer F1.")
        return "\n".join(lines)

    def csv(self) -> str:
        buffer = io.StringIO()
        keys = ["region", "model", "arch", "encoder", "iou", "f1", "precision", "recall", "object_f1",
                "boundary_iou", "threshold", "paper_max_iou", "paper_max_epoch", "validation_iou", "best_epoch",
                "oracle_iou", "oracle_threshold", "run"]
        writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        return buffer.getvalue()


def grid_settings(grid: str | None, arch: list[str] | None, encoder: list[str] | None,
                  overrides: dict[str, Any]) -> tuple[list[str], list[str], dict[str, Any]]:
    """Architectures, encoders and shared fit settings from a grid file, overridden by flags."""
    shared: dict[str, Any] = {}
    if grid:
        shared = load_config(grid, FitConfig.keys())
    grid_arch = shared.pop("arch", None)
    grid_encoder = shared.pop("encoder", None)
    archs = arch or ([grid_arch] if isinstance(grid_arch, str) else grid_arch)
    encoders = encoder or ([grid_encoder] if isinstance(grid_encoder, str) else grid_encoder)
    if not archs or not encoders:
        raise InputError("give --arch and --encoder (or a --grid file that lists them)")
    for key in ("records", "logdir", "holdout_region", "train_regions", "val_regions"):
        shared.pop(key, None)
    shared.update({k: v for k, v in overrides.items() if v is not None})
    return list(archs), list(encoders), shared


def crossval(records: str, logdir: str, arch: list[str] | None = None, encoder: list[str] | None = None,
             grid: str | None = None, regions: list[str] | None = None, overrides: dict[str, Any] | None = None,
             report: Callable[[str], None] | None = None, engine: str = "local", workers: int = 1) -> CrossvalResult:
    """Train and evaluate every architecture x encoder with each region held out once.

    Each run lives in LOGDIR/<arch>_<encoder>/<region>; re-running skips finished runs and resumes an
    interrupted one. Writes LOGDIR/crossval.csv and crossval.md. engine "local" trains the runs one
    after the other in this process; "ray" runs one Ray task per run (one GPU each when the cluster
    has GPUs, else `workers` CPUs), so a grid fills every GPU of a cluster. A run that fails on a
    user's error does not stop the others: the tables hold the rest and an InputError names it.
    """
    from rts_tf.train import check_config

    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine}")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    manifest = read_manifest(records)
    archs, encoders, shared = grid_settings(grid, arch, encoder, overrides or {})
    held_out = regions or list(manifest["regions"])
    unknown = [r for r in held_out if r not in manifest["regions"]]
    if unknown:
        raise InputError(f"region '{unknown[0]}' is not in the records (regions: {', '.join(manifest['regions'])})")
    if len(manifest["regions"]) < 2:
        raise InputError(f"{records}: cross-validation needs at least two regions")
    base = FitConfig(records=str(records), logdir=str(logdir), **shared)
    configs = [replace(base, arch=a, encoder=e, holdout_region=r, logdir=str(Path(logdir) / f"{a}_{e}" / r))
               for a in archs for e in encoders for r in held_out]
    for config in configs:
        check_config(config)  # every name is checked before hours of training start
    keys = [f"{config.arch} {config.encoder}, held out {config.holdout_region}" for config in configs]
    result = CrossvalResult(str(logdir))
    finished: dict[str, dict] = {}
    failed: dict[str, str] = {}

    def collect(outcomes) -> None:
        for run in outcomes:
            if run.error is not None:
                failed[run.key] = run.error
                if report:
                    report(f"{run.key}: failed: {run.error}")
                continue
            finished[run.key] = run.result
            if report:
                row, paper = run.result["row"], run.result["row"]["paper_max_iou"]
                report(f"{run.key}: transfer IoU {row['iou']:.3f}, paper-style max IoU "
                       f"{'-' if paper is None else f'{paper:.3f}'}{' (already trained)' if run.result['skipped'] else ''}")

    if engine == "ray":
        from rts_tf.engine import cluster_gpus, ray_session, ray_tasks

        with ray_session(workers) as ray:
            # max_calls=1: each run in a fresh process, so TensorFlow frees its GPU and takes its thread setting.
            gpus = cluster_gpus(ray)
            resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": workers}
            jobs = [(config, str(records), None if gpus else workers) for config in configs]
            collect(ray_tasks(ray, crossval_run, jobs, keys, [resources] * len(jobs), label="crossval_run",
                              fresh_process=True))
    else:
        collect(local_jobs(crossval_run, [(config, str(records), None) for config in configs], keys))
    for key in keys:  # the grid's order, whatever order the runs finished in
        if key in finished:
            result.rows.append(finished[key]["row"])
            result.skipped += finished[key]["skipped"]
            result.trained += not finished[key]["skipped"]
    Path(logdir).mkdir(parents=True, exist_ok=True)
    write_text(Path(logdir) / "crossval.csv", result.csv())
    write_text(Path(logdir) / "crossval.md", result.markdown() + "\n")
    if failed:
        raise InputError(failures_message(failed, len(configs), "runs",
                                          f"the tables in {logdir} hold the other {len(finished)}; run the command "
                                          "again after fixing the cause: finished runs are skipped"))
    return result


def crossval_run(job: tuple[FitConfig, str, int | None], advance: Callable[[int], None] | None = None) -> dict:
    """Train (or resume, or skip when finished) one run of the grid and score it on its held-out
    region: {"row": its table row, "skipped": whether it was already trained}. `threads` limits
    TensorFlow's CPU threads (a Ray task given that many CPUs)."""
    import tensorflow as tf

    from rts_tf.evaluate import evaluate
    from rts_tf.train import fit

    config, records, threads = job
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already running in this process: it keeps its threads
            pass
    fitted = fit(config)
    run = Path(config.logdir)
    metrics_file = run / "metrics.json"
    if metrics_file.exists() and metrics_file.stat().st_mtime >= (run / "run.json").stat().st_mtime:
        metrics = json.loads(metrics_file.read_text())
    else:
        metrics = evaluate(str(run), records)
    overall = metrics["overall"]
    run_info = json.loads((run / "run.json").read_text())
    row = {"region": config.holdout_region, "model": f"{config.arch} {config.encoder}",
           "arch": config.arch, "encoder": config.encoder, **overall,
           "threshold": metrics["threshold"],
           "paper_max_iou": metrics["paper_style"]["max_iou"],
           "paper_max_epoch": metrics["paper_style"]["epoch"],
           "validation_iou": run_info["metrics"].get("iou", 0.0),
           "best_epoch": run_info["best_epoch"], "oracle_iou": overall["best_iou"],
           "oracle_threshold": overall["best_threshold"], "run": str(run)}
    tf.keras.backend.clear_session()
    return {"row": row, "skipped": bool(fitted.skipped)}
