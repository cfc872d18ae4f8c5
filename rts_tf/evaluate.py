"""Evaluation: a run's predictions blended per scene from records, scored per region and overall.

One scorer serves every number: tiles go through the model and are blended into scene mosaics as
`predict` blends its windows, and pixels are counted once. Three numbers come out of it for a
held-out region (see `oracle_and_paper_style`):

- transfer: the model of the best epoch and the threshold, both chosen on the run's inner
  validation data (the scored region played no part in either);
- paper-style max IoU (Nitze et al. 2021): the best epoch on the held-out region at the fixed
  threshold 0.5 (the per-epoch test curves, scored by this same scorer during training);
- oracle: the best epoch and the best threshold of the sweep, both on the held-out region.

transfer <= oracle and paper-style <= oracle by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import hashlib
import json
from typing import Sequence

import numpy as np
from rasterio import Affine
from scipy import ndimage

import rts_tf
from rts_tf.errors import InputError
from rts_tf.records import IGNORE, read_manifest, records_fingerprint, select_bands, write_json, write_text
from rts_tf.scoring import SWEEP, best_of_sweep, scores

# The sweep's thresholds as the float32 that probabilities are compared with (p >= t).
SWEEP_FLOAT32 = np.asarray(SWEEP, dtype=np.float32)

BOUNDARY_PIXELS = 2
OBJECT_IOU = 0.5


@dataclass
class Counts:
    """Additive counts from which every metric follows; sum them over scenes and regions."""

    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0
    sweep: np.ndarray = field(default_factory=lambda: np.zeros((3, len(SWEEP))))
    true_objects: int = 0
    predicted_objects: int = 0
    matched_objects: int = 0
    boundary_intersection: float = 0.0
    boundary_union: float = 0.0
    scenes: int = 0

    def add(self, other: "Counts") -> None:
        for name in ("tp", "fp", "fn", "true_objects", "predicted_objects", "matched_objects",
                     "boundary_intersection", "boundary_union", "scenes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.sweep = self.sweep + other.sweep

    def add_pixels(self, label: np.ndarray, probability: np.ndarray, threshold: float) -> None:
        """Add the pixel counts of part of a scene (label 0, 1, 255 and probability)."""
        valid = label != IGNORE
        truth, p = label[valid] == 1, probability[valid].astype(np.float32, copy=False)
        predicted = p >= np.float32(threshold)
        self.tp += float(np.count_nonzero(truth & predicted))
        self.fp += float(np.count_nonzero(~truth & predicted))
        self.fn += float(np.count_nonzero(truth & ~predicted))
        # Every sweep threshold in one pass: a pixel is above the first `levels` thresholds.
        levels = np.searchsorted(SWEEP_FLOAT32, p, side="right")
        slumps = np.bincount(levels[truth], minlength=len(SWEEP) + 1)
        others = np.bincount(levels[~truth], minlength=len(SWEEP) + 1)
        above_slumps = np.cumsum(slumps[::-1])[::-1][1:]  # slump pixels with p >= SWEEP[k]
        above_others = np.cumsum(others[::-1])[::-1][1:]
        self.sweep += np.stack([above_slumps, above_others, slumps.sum() - above_slumps]).astype(np.float64)

    def add_objects(self, truth: np.ndarray, predicted: np.ndarray, valid: np.ndarray, min_pixels: int) -> None:
        """Add the object and boundary counts of a whole scene's masks."""
        objects = match_objects(truth, predicted, min_pixels=min_pixels)
        self.true_objects += objects[0]
        self.predicted_objects += objects[1]
        self.matched_objects += objects[2]
        intersection, union = boundary_overlap(truth, predicted, valid)
        self.boundary_intersection += intersection
        self.boundary_union += union

    def metrics(self) -> dict[str, float]:
        def ratio(a, b):
            return float(a / b) if b else 0.0

        best_iou, best_threshold = best_of_sweep(*self.sweep)
        object_precision = ratio(self.matched_objects, self.predicted_objects)
        object_recall = ratio(self.matched_objects, self.true_objects)
        return {
            **{key: float(value) for key, value in scores(self.tp, self.fp, self.fn).items()},
            "best_iou": float(best_iou),
            "best_threshold": float(best_threshold),
            "object_precision": object_precision,
            "object_recall": object_recall,
            "object_f1": ratio(2 * object_precision * object_recall, object_precision + object_recall),
            "boundary_iou": ratio(self.boundary_intersection, self.boundary_union),
            "slump_pixels": int(self.tp + self.fn),
            "true_objects": self.true_objects,
            "predicted_objects": self.predicted_objects,
            "scenes": self.scenes,
        }


def score_scene(label: np.ndarray, probability: np.ndarray, threshold: float = 0.5, min_pixels: int = 0) -> Counts:
    """Counts for one scene mosaic: label (0, 1, 255) and probability; ignored pixels excluded.
    Predicted objects of fewer than `min_pixels` pixels are not counted as objects."""
    counts = Counts(scenes=1)
    counts.add_pixels(label, probability, threshold)
    valid = label != IGNORE
    counts.add_objects((label == 1) & valid, (probability >= threshold) & valid, valid, min_pixels)
    return counts


def match_objects(truth: np.ndarray, predicted: np.ndarray, threshold: float = OBJECT_IOU,
                  min_pixels: int = 0) -> tuple[int, int, int]:
    """(true objects, predicted objects, matched pairs): 8-connected components, a pair matching
    when their IoU is at least 0.5 (such a match is unique, so no assignment problem arises).
    Predicted components smaller than `min_pixels` are left out, as `predict` leaves out their polygons."""
    structure = np.ones((3, 3), dtype=bool)
    true_labels, true_count = ndimage.label(truth, structure)
    predicted_labels, predicted_count = ndimage.label(predicted, structure)
    if min_pixels > 1 and predicted_count:
        kept = np.bincount(predicted_labels.ravel()) >= min_pixels
        kept[0] = False
        predicted_labels, predicted_count = ndimage.label(kept[predicted_labels], structure)
    if true_count == 0 or predicted_count == 0:
        return true_count, predicted_count, 0
    overlap = (true_labels > 0) & (predicted_labels > 0)
    pairs, intersections = np.unique(np.stack([true_labels[overlap], predicted_labels[overlap]]), axis=1,
                                     return_counts=True)
    true_sizes = np.bincount(true_labels.ravel(), minlength=true_count + 1)
    predicted_sizes = np.bincount(predicted_labels.ravel(), minlength=predicted_count + 1)
    ious = intersections / (true_sizes[pairs[0]] + predicted_sizes[pairs[1]] - intersections)
    return true_count, predicted_count, int(np.count_nonzero(ious >= threshold))


def boundary_overlap(truth: np.ndarray, predicted: np.ndarray, valid: np.ndarray,
                     width: int = BOUNDARY_PIXELS) -> tuple[float, float]:
    """Intersection and union of the inner boundary bands (Cheng et al. 2021, boundary IoU):
    the pixels of each mask within `width` pixels of its contour, over valid pixels."""
    def band(mask):
        return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=1)

    true_band, predicted_band = band(truth) & valid, band(predicted) & valid
    return float(np.count_nonzero(true_band & predicted_band)), float(np.count_nonzero(true_band | predicted_band))


def blend_records_scene(records: str, manifest: dict, scene: dict, runs, batch_size: int = 32):
    """Yield (first row, probability, label) strips of one scene from its records: the tiles go
    through the model and are blended as `predict` blends its windows, rows handed out as they
    become final, so the scene's probability is never held whole."""
    import tensorflow as tf

    from rts_tf.inference import StripBlender, predict_tiles
    from rts_tf.records import decode_example

    size, height, width = manifest["tile_size"], scene["height"], scene["width"]
    paths = [str(Path(records) / p) for p in scene["shards"]]
    shards = tf.data.TFRecordDataset(paths, compression_type=manifest["compression"])
    # A first, cheap pass for the tiles' rows: rows above every later tile's are final.
    rows = np.array([int(s["row"]) for s in shards.map(lambda s: decode_example(s, manifest, keys=("row",)))
                     .as_numpy_iterator()], dtype=np.int64)
    if len(rows) == 0:
        return
    final_before = np.append(np.minimum.accumulate(rows[::-1])[::-1], height)
    blender = StripBlender(height, width, size, fill=IGNORE)
    done = 0
    tiles = shards.map(lambda s: decode_example(s, manifest, keys=("image", "label", "row", "col")))
    for batch in tiles.batch(batch_size).as_numpy_iterator():
        probability = predict_tiles(runs, batch["image"], batch_size,
                                    band_names=[band["name"] for band in manifest["bands"]])
        for tile_label, tile_probability, row, col in zip(batch["label"], probability, batch["row"], batch["col"]):
            blender.add(int(row), int(col), tile_probability, tile_label[..., 0])
        done += len(probability)
        first, strip, label, _ = blender.pop(int(final_before[done]))
        if len(strip):
            yield first, strip, label


def score_records_scene(records: str, manifest: dict, scene: dict, runs, threshold: float, min_pixels: int,
                        objects: bool = True, batch_size: int = 32) -> Counts:
    """Counts for one scene from its records (the mean probability of `runs`), scored strip by strip.

    The object and boundary metrics need the scene's connected components, so three boolean masks
    (3 bytes a pixel) are kept for them; nothing else grows with the scene. objects=False counts
    pixels only (the per-epoch test curves).
    """
    counts = Counts(scenes=1)
    shape = (scene["height"], scene["width"]) if objects else (0, 0)
    truth, predicted, valid = (np.zeros(shape, dtype=bool) for _ in range(3))
    for first, strip, label in blend_records_scene(records, manifest, scene, runs, batch_size):
        counts.add_pixels(label, strip, threshold)
        if objects:
            rows = slice(first, first + len(strip))
            valid[rows] = label != IGNORE
            truth[rows] = label == 1
            predicted[rows] = (strip >= np.float32(threshold)) & valid[rows]
    if objects:
        counts.add_objects(truth, predicted, valid, min_pixels)
    return counts


def score_scenes(records: str, manifest: dict, scene_ids: Sequence[str], runs, threshold: float,
                 min_area: float = 0.0, objects: bool = True, batch_size: int = 32) -> Counts:
    """The counts of some scenes of the records summed: the one scorer of evaluate and the test curves."""
    total = Counts()
    wanted = set(scene_ids)
    for scene in manifest["scenes"]:
        if scene["scene_id"] in wanted and scene["tiles"]:
            transform = Affine(*scene["transform"][:6])
            min_pixels = int(np.ceil(min_area / abs(transform.a * transform.e)))
            total.add(score_records_scene(records, manifest, scene, runs, threshold, min_pixels, objects, batch_size))
    return total


def evaluate(run_path: str | Sequence[str], records: str, region: str | None = None, out: str | None = None,
             threshold: float | None = None, min_area: float = 100.0, verify: bool = False,
             trust_model: bool = False) -> dict:
    """Scores per region and overall for a run (or an ensemble of runs: their mean probability) on
    records; writes metrics.json and metrics.md.

    By default the run's held-out (test) region is scored; region='all' scores every region. Each
    region's row says what it is to the run(s): held-out or unseen (transfer), or training or
    validation data (not a transfer score). The threshold is the run's (chosen on its validation
    data) unless given. Predicted objects smaller than `min_area` (m2) are not counted, as `predict`
    drops them. metrics.json carries a key of everything the scores depend on (`evaluation_key`).
    """
    from rts_tf.dataset import check_shards
    from rts_tf.inference import check_recipes, choose_threshold, load_run, run_bands
    from rts_tf.scene import recipe_differences

    paths = [run_path] if isinstance(run_path, (str, Path)) else list(run_path)
    if not paths:
        raise InputError("give at least one --run")
    runs = [load_run(path, trust_model=trust_model) for path in paths]
    full = read_manifest(records)
    names = [band["name"] for band in full["bands"]]
    for run in runs:
        if [name for name in names if name in run.bands] != run.bands or full["tile_size"] != run.tile_size:
            raise InputError(f"{records}: records lack bands or have another tile size than the run {run.path} "
                             f"(records: {', '.join(names)}, {full['tile_size']} px; run: {', '.join(run.bands)}, "
                             f"{run.tile_size} px)")
        differs = recipe_differences(full["recipe"], run.recipe, run.bands) if full.get("recipe") and \
            run.info.get("recipe") else []
        if differs:  # (records of another sensor are a transfer test: allowed)
            raise InputError(f"{records}: records were built with other feature settings than the run's "
                             f"({', '.join(differs)}); its model would see other bands than it was trained on")
    check_recipes(runs)
    # Only the runs' bands are decoded (a run may train on a subset of the records' bands: fit --bands).
    manifest = select_bands(full, run_bands(runs), str(records))
    holdouts = {run.info.get("holdout_region") for run in runs}
    holdout = holdouts.pop() if len(holdouts) == 1 else None
    if region is None:
        if not holdout:
            raise InputError(f"{paths[0]}: the run{'s have no common' if len(runs) > 1 else ' has no'} held-out "
                             "region; give --region NAME (or 'all')")
        regions = [holdout]
    elif region == "all":
        regions = list(manifest["regions"])
    elif region in manifest["regions"]:
        regions = [region]
    else:
        raise InputError(f"region '{region}' is not in the records (regions: {', '.join(manifest['regions'])})")
    unknown = [r for r in regions if r not in manifest["regions"]]
    if unknown:
        raise InputError(f"{records}: region '{unknown[0]}' is not in these records; use --region")
    threshold, threshold_source = choose_threshold(runs, threshold)
    check_shards(manifest, sorted(path for path, info in manifest["shards"].items() if info["region"] in regions),
                 records, verify)
    by_region: dict[str, Counts] = {}
    for name in regions:
        scene_ids = [scene["scene_id"] for scene in manifest["scenes"] if scene["region"] == name]
        by_region[name] = score_scenes(records, manifest, scene_ids, runs, threshold, min_area)
    overall = Counts()
    for counts in by_region.values():
        overall.add(counts)
    single = runs[0].info if len(runs) == 1 else {}
    result = {"run": str(paths[0]) if len(paths) == 1 else [str(p) for p in paths], "records": str(records),
              "threshold": threshold, "threshold_source": threshold_source, "min_area_m2": min_area,
              "regions": {name: counts.metrics() for name, counts in by_region.items()},
              "overall": overall.metrics(), "paper_style": paper_style(single),
              "key": evaluation_key(paths, full, regions, threshold if threshold_source.startswith("given")
                                    else None, min_area)}
    for name, metrics in result["regions"].items():
        metrics["kind"] = region_kind(name, runs)
        oracle, paper = oracle_and_paper_style(single, metrics) if name == holdout and single else \
            (metrics["best_iou"], None)
        metrics["paper_max_iou"], metrics["oracle_iou"] = paper, oracle
    result["overall"]["kind"] = ", ".join(dict.fromkeys(m["kind"] for m in result["regions"].values()))
    out_dir = Path(out or paths[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", result, unique=True)
    write_text(out_dir / "metrics.md", markdown_table(result) + "\n", unique=True)
    return result


def evaluation_key(run_paths: Sequence[str], manifest: dict, regions: Sequence[str], threshold: float | None,
                   min_area: float) -> str:
    """What scores depend on: each run's run.json, the records' content, the regions, a given
    threshold (None: the runs' own), the minimum object area and the code's version."""
    runs = [hashlib.sha256((Path(path) / "run.json").read_bytes()).hexdigest() for path in run_paths]
    content = {"runs": runs, "records": records_fingerprint(manifest), "regions": sorted(regions),
               "threshold": threshold, "min_area": min_area, "version": rts_tf.__version__, "scorer": SCORER}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# The scorer's name in run.json and keys: per-epoch test curves made by it are comparable with evaluate.
SCORER = "scene mosaics"


def region_kind(region: str, runs) -> str:
    """What a region is to the runs: held-out or unseen (transfer scores), or training or validation data."""
    parts = [run.info.get("regions") or {} for run in runs]
    if any(region in part.get("train", []) for part in parts):
        return "training data"
    if any(region in part.get("validation", []) for part in parts):
        return "validation data"
    if any(region in part.get("test", []) for part in parts):
        return "held-out (transfer)"
    return "unseen (transfer)"


def paper_style(run_info: dict) -> dict:
    """Nitze et al. (2021)'s number: the best per-epoch IoU on the held-out region at threshold 0.5,
    from the run's test curves (scored on scene mosaics during training). Runs whose curves were
    scored otherwise (before rts-tf 0.x scored them on mosaics) have none."""
    history = run_info.get("history") or {}
    curve = history.get("test_iou") or []
    if not curve or run_info.get("test_scorer") != SCORER:
        return {"region": run_info.get("holdout_region"), "max_iou": None, "epoch": None}
    best = int(np.nanargmax(curve))
    return {"region": run_info.get("holdout_region"), "max_iou": float(curve[best]), "epoch": best + 1}


def oracle_and_paper_style(run_info: dict, metrics: dict) -> tuple[float, float | None]:
    """(oracle IoU, paper-style max IoU) of the held-out region: the oracle is the best IoU over
    epochs and sweep thresholds (the test curves' per-epoch best, and this evaluation's sweep of the
    chosen epoch), so it bounds both the transfer IoU and the paper-style number."""
    paper = paper_style(run_info)["max_iou"]
    history = run_info.get("history") or {}
    curves = history.get("test_best_iou") if run_info.get("test_scorer") == SCORER else None
    candidates = [metrics["best_iou"], *(curves or []), *([paper] if paper is not None else [])]
    return float(np.nanmax(candidates)), paper


COLUMNS = [("iou", "IoU"), ("f1", "F1"), ("precision", "precision"), ("recall", "recall"),
           ("object_precision", "obj. P"), ("object_recall", "obj. R"), ("object_f1", "obj. F1"),
           ("boundary_iou", "boundary IoU"), ("paper_max_iou", "paper-style max IoU"),
           ("oracle_iou", "oracle IoU")]


def markdown_table(result: dict) -> str:
    """The metrics as a Markdown table: a row per region and one for all, and what the columns mean."""
    header = "| region | scores | scenes | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (len(COLUMNS) + 3)]
    rows = list(result["regions"].items()) + ([("all", result["overall"])] if len(result["regions"]) > 1 else [])

    def cell(value):
        return "-" if value is None else f"{value:.3f}"

    for name, metrics in rows:
        lines.append(f"| {name} | {metrics.get('kind', '')} | {metrics['scenes']} | " +
                     " | ".join(cell(metrics.get(key)) for key, _ in COLUMNS) + " |")
    lines += ["", f"IoU to boundary IoU: the model of the best validation epoch at threshold {result['threshold']:.2f} "
                  f"({result['threshold_source']}). On a held-out or unseen region these are transfer scores; "
                  "on training or validation data they are not.",
              "Paper-style max IoU (held-out region only): the best epoch on the held-out region at the fixed "
              "threshold 0.5, as Nitze et al. (2021) report it; it selects the epoch on the data it scores.",
              "Oracle IoU: the best IoU over the threshold sweep on the scored region itself (for the held-out "
              "region: over every epoch too); an upper bound, not a transfer score.",
              "Every number is scored on scene mosaics (overlapping tiles blended, each pixel counted once)."]
    return "\n".join(lines)
