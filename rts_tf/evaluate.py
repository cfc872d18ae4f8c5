"""Evaluation: a run's predictions mosaicked per scene from records, scored per region and overall."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rasterio import Affine
from scipy import ndimage

from rts_tf.errors import InputError
from rts_tf.records import IGNORE, read_manifest, write_json

SWEEP = np.round(np.arange(0.05, 0.96, 0.05), 2)
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

    def metrics(self) -> dict[str, float]:
        def ratio(a, b):
            return float(a / b) if b else 0.0

        sweep_iou = np.divide(self.sweep[0], self.sweep.sum(axis=0), out=np.zeros(len(SWEEP)),
                              where=self.sweep.sum(axis=0) > 0)
        best = int(np.argmax(sweep_iou))
        object_precision = ratio(self.matched_objects, self.predicted_objects)
        object_recall = ratio(self.matched_objects, self.true_objects)
        return {
            "iou": ratio(self.tp, self.tp + self.fp + self.fn),
            "f1": ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            "precision": ratio(self.tp, self.tp + self.fp),
            "recall": ratio(self.tp, self.tp + self.fn),
            "best_iou": float(sweep_iou[best]),
            "best_threshold": float(SWEEP[best]),
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
    valid = label != IGNORE
    truth = (label == 1) & valid
    predicted = (probability >= threshold) & valid
    counts = Counts(scenes=1)
    counts.tp = float(np.count_nonzero(truth & predicted))
    counts.fp = float(np.count_nonzero(~truth & predicted))
    counts.fn = float(np.count_nonzero(truth & ~predicted))
    p, t = probability[valid], truth[valid]
    for index, level in enumerate(SWEEP):
        above = p >= level
        counts.sweep[:, index] = (np.count_nonzero(above & t), np.count_nonzero(above & ~t), np.count_nonzero(~above & t))
    objects = match_objects(truth, predicted, min_pixels=min_pixels)
    counts.true_objects, counts.predicted_objects, counts.matched_objects = objects
    intersection, union = boundary_overlap(truth, predicted, valid)
    counts.boundary_intersection, counts.boundary_union = intersection, union
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


def scene_mosaics(records: str, manifest: dict, scene: dict, run) -> tuple[np.ndarray, np.ndarray]:
    """Label and blended probability over one scene's grid from its tiles (overlaps counted once)."""
    import tensorflow as tf

    from rts_tf.predict import predict_tiles, window_weights
    from rts_tf.records import decode_example

    size = manifest["tile_size"]
    height, width = scene["height"] + size, scene["width"] + size  # room for padded edge tiles
    label = np.full((height, width), IGNORE, dtype=np.uint8)
    sums = np.zeros((height, width), dtype=np.float32)
    norms = np.zeros((height, width), dtype=np.float32)
    weights = window_weights(size)
    paths = [str(Path(records) / p) for p in scene["shards"]]
    dataset = tf.data.TFRecordDataset(paths, compression_type=manifest["compression"]).map(
        lambda s: decode_example(s, manifest)).batch(32)
    for batch in dataset.as_numpy_iterator():
        probability = predict_tiles([run], batch["image"], 32, flips=False)
        for tile_label, tile_probability, row, col in zip(batch["label"], probability, batch["row"], batch["col"]):
            label[row:row + size, col:col + size] = tile_label[..., 0]
            sums[row:row + size, col:col + size] += tile_probability * weights
            norms[row:row + size, col:col + size] += weights
    probability = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
    return label[:scene["height"], :scene["width"]], probability[:scene["height"], :scene["width"]]


def evaluate(run_path: str, records: str, region: str | None = None, out: str | None = None,
             threshold: float = 0.5, min_area: float = 100.0) -> dict:
    """Metrics per region and overall for a run on records; writes metrics.json and metrics.md.

    By default the run's validation regions are scored; region='all' scores every region.
    Predicted objects smaller than `min_area` (m2) are not counted, as `predict` drops them.
    """
    from rts_tf.predict import load_run

    run = load_run(run_path)
    manifest = read_manifest(records)
    run_info = json.loads((Path(run_path) / "run.json").read_text())
    if [b["name"] for b in manifest["bands"]] != run.bands or manifest["tile_size"] != run.tile_size:
        raise InputError(f"{records}: records have other bands or tile size than the run {run_path}")
    if region is None:
        regions = [r for r in run_info["regions"]["validation"] if r in manifest["regions"]]
    elif region == "all":
        regions = list(manifest["regions"])
    elif region in manifest["regions"]:
        regions = [region]
    else:
        raise InputError(f"region '{region}' is not in the records (regions: {', '.join(manifest['regions'])})")
    if not regions:
        raise InputError(f"{records}: none of the run's validation regions are in these records; use --region")
    from rts_tf.dataset import shards_of

    shards_of(manifest, regions, records)  # verify checksums first
    by_region: dict[str, Counts] = {name: Counts() for name in regions}
    for scene in manifest["scenes"]:
        if scene["region"] in regions and scene["tiles"]:
            label, probability = scene_mosaics(records, manifest, scene, run)
            transform = Affine(*scene["transform"][:6])
            min_pixels = int(np.ceil(min_area / abs(transform.a * transform.e)))
            by_region[scene["region"]].add(score_scene(label, probability, threshold, min_pixels))
    overall = Counts()
    for counts in by_region.values():
        overall.add(counts)
    result = {"run": str(run_path), "records": str(records), "threshold": threshold,
              "min_area_m2": min_area, "regions": {name: counts.metrics() for name, counts in by_region.items()},
              "overall": overall.metrics()}
    out_dir = Path(out or run_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", result)
    (out_dir / "metrics.md").write_text(markdown_table(result) + "\n")
    return result


COLUMNS = [("iou", "IoU"), ("f1", "F1"), ("precision", "precision"), ("recall", "recall"),
           ("best_iou", "best IoU"), ("best_threshold", "at"), ("object_precision", "obj. P"),
           ("object_recall", "obj. R"), ("object_f1", "obj. F1"), ("boundary_iou", "boundary IoU")]


def markdown_table(result: dict) -> str:
    """The metrics as a Markdown table: a row per region and one for all."""
    header = "| region | scenes | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (len(COLUMNS) + 2)]
    rows = list(result["regions"].items()) + [("all", result["overall"])]
    for name, metrics in rows:
        lines.append(f"| {name} | {metrics['scenes']} | " +
                     " | ".join(f"{metrics[key]:.3f}" if key != "best_threshold" else f"{metrics[key]:.2f}"
                                for key, _ in COLUMNS) + " |")
    return "\n".join(lines)
