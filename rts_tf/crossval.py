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
from rts_tf.locks import locks_folder


# Scores of each run (and their spread over seeds); a None (no held-out curve) is left out of means.
SCORES = (("iou", "transfer IoU"), ("paper_max_iou", "paper-style max IoU"), ("f1", "transfer F1"))


def mean_sd(values) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, n) of the values that are not None; sd None for fewer than two."""
    kept = [float(v) for v in values if v is not None and v == v]
    if not kept:
        return None, None, 0
    mean = sum(kept) / len(kept)
    sd = (sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)) ** 0.5 if len(kept) > 1 else None
    return mean, sd, len(kept)


def spread(values, digits: int = 3) -> str:
    """'mean ± sd' of the values that are not None ('mean' alone for one value, '-' for none)."""
    mean, sd, n = mean_sd(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


@dataclass
class CrossvalResult:
    """A run per model, held-out region and seed (`rows`), and a seed ensemble per cell (`ensembles`)."""

    logdir: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    ensembles: list[dict[str, Any]] = field(default_factory=list)
    trained: int = 0
    skipped: int = 0

    def cells(self) -> dict[tuple[str, str], list[dict]]:
        cells: dict[tuple[str, str], list[dict]] = {}
        for row in self.rows:
            cells.setdefault((row["region"], row["model"]), []).append(row)
        return cells

    def aggregates(self) -> list[dict[str, Any]]:
        """One row per cell: mean and sd over its seeds of every score."""
        rows = []
        for (region, model), runs in self.cells().items():
            row = {"region": region, "model": model, "arch": runs[0]["arch"], "encoder": runs[0]["encoder"],
                   "band_set": runs[0].get("band_set", ""), "bands": runs[0].get("bands", ""),
                   "seed": "mean", "n": len(runs)}
            for key in CSV_SCORES:
                mean, sd, _ = mean_sd(run.get(key) for run in runs)
                row[key], row[f"{key}_sd"] = mean, sd
            rows.append(row)
        return rows

    def markdown(self) -> str:
        models = list(dict.fromkeys(row["model"] for row in self.rows))  # the grid's order
        regions = list(dict.fromkeys(row["region"] for row in self.rows))
        cells = self.cells()
        means = {cell: {key: mean_sd(run.get(key) for run in runs)[0] for key, _ in SCORES}
                 for cell, runs in cells.items()}

        def of_means(chosen: list[tuple[str, str]]) -> str:
            # The mean of cells' means (no sd: regions and models are not repetitions).
            return " / ".join(spread([mean_sd(means[c][key] for c in chosen)[0]]) for key, _ in SCORES) \
                if chosen else ""

        lines = ["| held-out region | " + " | ".join(models) + " | mean over columns |",
                 "|" + " --- |" * (len(models) + 2)]
        for region in regions:
            values = [" / ".join(spread(run.get(key) for run in cells[(region, m)]) for key, _ in SCORES)
                      if (region, m) in cells else "" for m in models]
            lines.append(f"| {region} | " + " | ".join(values) +
                         f" | {of_means([(region, m) for m in models if (region, m) in cells])} |")
        lines.append("| mean | " + " | ".join(of_means([(r, m) for r in regions if (r, m) in cells]) for m in models) +
                     f" | {of_means(list(cells))} |")
        n = ", ".join(str(count) for count in sorted({len(runs) for runs in cells.values()}))
        lines += ["", f"Cells: {' / '.join(title for _, title in SCORES)}, each the mean ± standard deviation over "
                      f"the runs of {n} seed(s) (one value: one run). Transfer: the model (best epoch) and threshold "
                      "chosen on validation data of the training regions, scored on the held-out region. "
                      "Paper-style max IoU: the best epoch on the held-out region at threshold 0.5, as Nitze et al. "
                      "(2021) report it. All scored on scene mosaics (see `rts-tf evaluate`). The mean row and "
                      "column average the cells' means, leaving out missing values."]
        band_sets = {row["band_set"]: row["bands"] for row in self.rows if row.get("band_set")}
        if band_sets:
            lines += ["", "Band sets (columns `model [band set]`, each trained on those bands of the records): " +
                      "; ".join(f"{name} = {bands}" for name, bands in band_sets.items()) + "."]
        if self.ensembles:
            lines += ["", "Seed ensemble (the mean probability of each cell's seeds, scored once; threshold: "
                          "see crossval.csv):", "",
                      "| held-out region | " + " | ".join(models) + " |", "|" + " --- |" * (len(models) + 1)]
            by_cell = {(row["region"], row["model"]): row for row in self.ensembles}
            for region in regions:
                lines.append(f"| {region} | " + " | ".join(
                    f"{by_cell[(region, m)]['iou']:.3f} / {by_cell[(region, m)]['f1']:.3f}"
                    if (region, m) in by_cell else "" for m in models) + " |")
            lines.append("")
            lines.append("Cells: transfer IoU / transfer F1 of the ensemble.")
        return "\n".join(lines)

    def csv(self) -> str:
        buffer = io.StringIO()
        keys = ["region", "model", "arch", "encoder", "band_set", "bands", "seed", "n", *[k for key in CSV_SCORES for k in (key, f"{key}_sd")],
                "threshold", "threshold_source", "paper_max_epoch", "best_epoch", "run"]
        writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for (region, model), runs in self.cells().items():
            writer.writerows(runs)
            writer.writerows(row for row in self.aggregates() if (row["region"], row["model"]) == (region, model))
            writer.writerows(row for row in self.ensembles if (row["region"], row["model"]) == (region, model))
        return buffer.getvalue()


CSV_SCORES = ("iou", "f1", "precision", "recall", "object_f1", "boundary_iou", "paper_max_iou", "oracle_iou",
              "validation_iou")


def grid_settings(grid: str | None, arch: list[str] | None, encoder: list[str] | None,
                  overrides: dict[str, Any], seeds: int | None = None
                  ) -> tuple[list[str], list[str], list[int] | None, dict[str, Any]]:
    """Architectures, encoders, seeds and shared fit settings from a grid file, overridden by flags.

    Seeds: `seeds` N gives 0..N-1; else a `seed` list in the grid; else None (one run of the shared
    `seed`, in the run folder of a grid without seeds).
    """
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
    seed_list = None
    if isinstance(shared.get("seed"), list):
        seed_list = shared.pop("seed")
        if not seed_list or not all(isinstance(value, int) for value in seed_list):
            raise InputError(f"{grid}: 'seed' must be a whole number or a list of them, got {seed_list}")
    if seeds is not None:
        if seeds < 1:
            raise InputError(f"--seeds must be at least 1, got {seeds}")
        seed_list = list(range(seeds))
    if seed_list is not None and len(set(seed_list)) != len(seed_list):
        raise InputError(f"the seeds {seed_list} repeat a seed")
    return list(archs), list(encoders), seed_list, shared


def band_sets_of(texts: list[str], manifest: dict) -> list[tuple[str, list[str] | None]]:
    """--band-set values (`NAME=BANDS`, or `BANDS` named by itself, e.g. `optical`) as (name, bands)
    resolved against the records' bands (rts_tf.bands.parse_bands; None: all of them)."""
    from rts_tf.bands import parse_bands
    from rts_tf.records import select_bands

    available = [band["name"] for band in manifest["bands"]]
    chosen: list[tuple[str, list[str] | None]] = []
    for text in texts:
        name, _, spec = text.partition("=") if "=" in text else (text, "", text)
        name = name.strip()
        if not name or not all(c.isalnum() or c in "+-_." for c in name):
            raise InputError(f"--band-set {text}: the name must be letters, digits and + - _ . (it names a folder)")
        try:
            bands = parse_bands(spec, available)
        except ValueError as error:
            raise InputError(f"--band-set {text}: {error}") from None
        select_bands(manifest, bands, f"--band-set {text}")  # bands the records lack: one line, before training
        if name in [known for known, _ in chosen]:
            raise InputError(f"--band-set {name} is given twice")
        chosen.append((name, None if bands == available else bands))
    return chosen


@locks_folder("logdir", "--logdir")
def crossval(records: str, logdir: str, arch: list[str] | None = None, encoder: list[str] | None = None,
             grid: str | None = None, regions: list[str] | None = None, overrides: dict[str, Any] | None = None,
             report: Callable[[str], None] | None = None, engine: str = "local", workers: int = 1,
             seeds: int | None = None, band_sets: list[str] | None = None) -> CrossvalResult:
    """Train and evaluate every architecture x encoder (x band set) (x seed) with each region held out once.

    Each run lives in LOGDIR/<arch>_<encoder>/<region> (with several seeds: .../<region>/seed<N>);
    with band sets (`band_sets`, `NAME=BANDS`: a band ablation) in LOGDIR/<arch>_<encoder>/<NAME>/<region>,
    each band set a column of the table beside the model (`<arch> <encoder> [NAME]`);
    re-running skips finished runs and resumes an interrupted one. Writes LOGDIR/crossval.csv (a
    row per run, a mean row per cell, a seed-ensemble row per cell) and crossval.md (mean ± sd over
    seeds). Scores are computed by crossval for its cell (cached in RUN/crossval/ under a key of
    everything they depend on), never read from a metrics.json written otherwise. engine "local"
    trains the runs one after the other in this process; "ray" runs one Ray task per run (one GPU
    each when the cluster has GPUs, else `workers` CPUs). A run that fails on a user's error does
    not stop the others: the tables hold the rest and an InputError names it.
    """
    from rts_tf.train import check_config

    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine}")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    manifest = read_manifest(records)
    archs, encoders, seed_list, shared = grid_settings(grid, arch, encoder, overrides or {}, seeds)
    held_out = regions or list(manifest["regions"])
    unknown = [r for r in held_out if r not in manifest["regions"]]
    if unknown:
        raise InputError(f"region '{unknown[0]}' is not in the records (regions: {', '.join(manifest['regions'])})")
    if len(manifest["regions"]) < 2:
        raise InputError(f"{records}: cross-validation needs at least two regions")
    sets = band_sets_of(band_sets, manifest) if band_sets else [(None, shared.pop("bands", None))]
    base = FitConfig(records=str(records), logdir=str(logdir), **shared)

    def folder(a: str, e: str, b: str | None, r: str, seed: int | None) -> str:
        cell = Path(logdir) / f"{a}_{e}" / (b or "") / r
        return str(cell if seed is None else cell / f"seed{seed}")

    grid_runs = [(replace(base, arch=a, encoder=e, holdout_region=r, logdir=folder(a, e, b, r, s), bands=bands,
                          **({} if s is None else {"seed": s})), b)
                 for a in archs for e in encoders for b, bands in sets for r in held_out for s in (seed_list or [None])]
    configs = [config for config, _ in grid_runs]
    for config in configs:
        check_config(config)  # every name is checked before hours of training start
    keys = [f"{config.arch} {config.encoder}{'' if b is None else f' [{b}]'}, held out {config.holdout_region}"
            f"{'' if seed_list is None else f', seed {config.seed}'}" for config, b in grid_runs]
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
            jobs = [(config, str(records), None if gpus else workers, b) for config, b in grid_runs]
            collect(ray_tasks(ray, crossval_run, jobs, keys, [resources] * len(jobs), label="crossval_run",
                              fresh_process=True))
    else:
        collect(local_jobs(crossval_run, [(config, str(records), None, b) for config, b in grid_runs], keys))
    for key in keys:  # the grid's order, whatever order the runs finished in
        if key in finished:
            result.rows.append(finished[key]["row"])
            result.skipped += finished[key]["skipped"]
            result.trained += not finished[key]["skipped"]
    if seed_list is not None and len(seed_list) > 1:
        for (region, model), runs in result.cells().items():
            if len(runs) > 1:
                row = ensemble_row([run["run"] for run in runs], str(records), region, model, runs[0])
                result.ensembles.append(row)
                if report:
                    report(f"{model}, held out {region}, ensemble of {len(runs)} seeds: transfer IoU {row['iou']:.3f}")
    Path(logdir).mkdir(parents=True, exist_ok=True)
    write_text(Path(logdir) / "crossval.csv", result.csv())
    write_text(Path(logdir) / "crossval.md", result.markdown() + "\n")
    if failed:
        raise InputError(failures_message(failed, len(configs), "runs",
                                          f"the tables in {logdir} hold the other {len(finished)}; run the command "
                                          "again after fixing the cause: finished runs are skipped"))
    return result


def scored(run_paths: list[str], records: str, region: str, out: Path) -> dict:
    """evaluate()'s result for these runs on one region, computed for this cell: reused from `out`
    only when its key (runs, records content, region, threshold policy, code version) matches."""
    from rts_tf.evaluate import evaluate, evaluation_key

    key = evaluation_key(run_paths, read_manifest(records), [region], None, 100.0)
    try:
        cached = json.loads((out / "metrics.json").read_text())
        if cached.get("key") == key:
            return cached
    except (OSError, json.JSONDecodeError):
        pass
    return evaluate(run_paths if len(run_paths) > 1 else run_paths[0], records, region=region, out=str(out))


def ensemble_row(run_paths: list[str], records: str, region: str, model: str, first: dict) -> dict:
    """The table row of a cell's seed ensemble: the mean probability of its runs, scored once."""
    metrics = scored(run_paths, records, region, Path(run_paths[0]).parent / "ensemble")
    overall = metrics["overall"]
    return {"region": region, "model": model, "arch": first["arch"], "encoder": first["encoder"],
            "band_set": first.get("band_set", ""), "bands": first.get("bands", ""), "seed": "ensemble", "n": len(run_paths), **{key: overall.get(key) for key in CSV_SCORES},
            "paper_max_iou": None, "oracle_iou": overall["best_iou"], "validation_iou": None,
            "threshold": metrics["threshold"], "threshold_source": metrics["threshold_source"],
            "run": str(Path(run_paths[0]).parent / "ensemble")}


def crossval_run(job: tuple, advance: Callable[[int], None] | None = None) -> dict:
    """Train (or resume, or skip when finished) one run of the grid and score it on its held-out
    region: {"row": its table row, "skipped": whether it was already trained}. The job is (config,
    records, threads, band set name or None); `threads` limits TensorFlow's CPU threads (a Ray task
    given that many CPUs)."""
    import tensorflow as tf

    from rts_tf.train import fit

    config, records, threads, band_set = (*job, None)[:4]
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already running in this process: it keeps its threads
            pass
    fitted = fit(config)
    run = Path(config.logdir)
    metrics = scored([str(run)], records, config.holdout_region, run / "crossval")
    overall = metrics["regions"][config.holdout_region]
    run_info = json.loads((run / "run.json").read_text())
    row = {"region": config.holdout_region,
           "model": f"{config.arch} {config.encoder}" + (f" [{band_set}]" if band_set else ""),
           "arch": config.arch, "encoder": config.encoder, "band_set": band_set or "",
           "bands": ",".join(band["name"] for band in run_info["bands"]), "seed": config.seed, "n": 1, **overall,
           "threshold": metrics["threshold"], "threshold_source": run_info.get("threshold_source"),
           "paper_max_epoch": metrics["paper_style"]["epoch"],
           "validation_iou": run_info["metrics"].get("iou", 0.0),
           "best_epoch": run_info["best_epoch"], "run": str(run)}
    tf.keras.backend.clear_session()
    return {"row": row, "skipped": bool(fitted.skipped)}
