"""Record inspection: verify shards, summarise regions and scenes, render tile previews."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rts_tf.records import IGNORE, decode_example, read_manifest, verify_shard
from rts_tf.visualize import band_panels, outline, side_by_side


@dataclass
class InspectReport:
    """What `rts-tf inspect` found; text() is the printed summary."""

    records: str
    manifest: dict
    problems: list[str] = field(default_factory=list)
    previews: list[str] = field(default_factory=list)

    def text(self) -> str:
        manifest = self.manifest
        size = manifest["tile_size"]
        lines = [f"records: {self.records} (schema {manifest['schema_version']}, {size} px tiles, "
                 f"overlap {manifest['overlap']}, compression '{manifest['compression']}', "
                 f"{len(manifest['shards'])} shards)",
                 f"shards verified: {len(manifest['shards']) - len(self.problems)} of {len(manifest['shards'])}"]
        lines += [f"  PROBLEM {problem}" for problem in self.problems]
        width = max([28] + [len(f"{s['scene_id']} ({s['region']})") + 2 for s in manifest["scenes"]])
        header = f"{'':<{width}}{'scenes':>7}{'tiles':>8}{'slump tiles':>13}{'slump px':>11}{'ignored':>9}"
        lines += ["", "by region", header]
        for region in manifest["regions"]:
            scenes = [s for s in manifest["scenes"] if s["region"] == region]
            lines.append(_row(region, scenes, size, width))
        lines.append(_row("all", manifest["scenes"], size, width))
        lines += ["", "by scene", header.replace("scenes", "      ")]
        for scene in manifest["scenes"]:
            lines.append(_row(f"{scene['scene_id']} ({scene['region']})", [scene], size, width, count=False))
        statistics = manifest["statistics"]["overall"]
        lines += ["", f"band statistics over {statistics['count']:,} valid pixels",
                  f"{'band':<28}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}"]
        for index, band in enumerate(manifest["bands"]):
            lines.append(f"{band['name'] + ' [' + band['unit'] + ']':<28}"
                         + "".join(f"{statistics[key][index]:>10.4g}" for key in ("mean", "std", "min", "max")))
        if self.previews:
            panels = ", ".join(preview_titles([band["name"] for band in manifest["bands"]]))
            lines += ["", f"previews ({panels}): {Path(self.previews[0]).parent} "
                          f"({len(self.previews)} PNG files)"]
        return "\n".join(lines)


def _row(name: str, scenes: list[dict], size: int, width: int, count: bool = True) -> str:
    tiles = sum(s["tiles"] for s in scenes)
    ignored = sum(s["ignored_pixels"] for s in scenes) / max(tiles * size * size, 1)
    return (f"{name:<{width}}{len(scenes) if count else '':>7}{tiles:>8}{sum(s['slump_tiles'] for s in scenes):>13}"
            f"{sum(s['slump_pixels'] for s in scenes):>11}{100 * ignored:>8.1f}%")


def inspect_records(records: str, previews: str | None = None, samples: int = 12,
                    tensorboard: str | None = None, seed: int = 0) -> InspectReport:
    """Verify every shard against manifest.json, and write previews of sampled tiles."""
    manifest = read_manifest(records)
    report = InspectReport(records, manifest)
    for path, info in manifest["shards"].items():
        problem = verify_shard(Path(records), path, info)
        if problem:
            report.problems.append(problem)
    if samples > 0:
        good = [path for path in manifest["shards"] if not any(path in p for p in report.problems)]
        tiles = sample_tiles(records, manifest, good, samples, seed)
        band_names = [band["name"] for band in manifest["bands"]]
        report.previews = write_previews(tiles, band_names, Path(previews or Path(records) / "previews"), tensorboard)
    return report


def sample_tiles(records: str, manifest: dict, shards: list[str], samples: int, seed: int) -> list[dict]:
    """About half slump tiles (most slump pixels first) and half random tiles, as numpy dicts."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    chosen = [shards[i] for i in sorted(rng.permutation(len(shards))[:samples])]
    candidates = []
    if chosen:
        dataset = tf.data.Dataset.from_tensor_slices([str(Path(records) / p) for p in chosen]).interleave(
            lambda path: tf.data.TFRecordDataset(path, compression_type=manifest["compression"]).take(32),
            cycle_length=1)
        for sample in dataset.map(lambda s: decode_example(s, manifest)).as_numpy_iterator():
            candidates.append(sample)
    by_slumps = sorted(range(len(candidates)), key=lambda i: -int(candidates[i]["slump_pixels"]))
    picked = [i for i in by_slumps[:samples // 2] if candidates[i]["slump_pixels"] > 0]
    rest = [i for i in rng.permutation(len(candidates)) if i not in picked]
    picked += rest[:samples - len(picked)]
    return [candidates[i] for i in picked]


def preview_titles(band_names: list[str]) -> list[str]:
    """The titles of a preview's panels for records of these bands."""
    blank = np.zeros((1, 1, len(band_names)), np.float32)
    return [title for title, _ in band_panels(blank, band_names, np.ones((1, 1), bool))] + ["label"]


def tile_panels(sample: dict, band_names: list[str]) -> np.ndarray:
    """One RGB image: the preview panels of a tile side by side (those its band set allows, see
    visualize.band_panels, then the label outlined on the first)."""
    image, label = sample["image"], sample["label"][..., 0]
    valid = label != IGNORE
    panels = [rgb for _, rgb in band_panels(image, band_names, valid)]
    return side_by_side([*panels, outline(panels[0], label)])


def write_previews(tiles: list[dict], band_names: list[str], folder: Path, tensorboard: str | None) -> list[str]:
    """Write each tile's panels as PNG (and as TensorBoard image summaries); return the paths."""
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    writer = tf.summary.create_file_writer(tensorboard) if tensorboard else None
    paths = []
    for index, sample in enumerate(tiles):
        panels = tile_panels(sample, band_names)
        scene_id = sample["scene_id"].decode()
        name = f"{index:02d}_{scene_id}_r{int(sample['row'])}_c{int(sample['col'])}.png"
        path = folder / name
        temporary = path.with_name(path.name + ".tmp")
        tf.io.write_file(str(temporary), tf.io.encode_png(panels))
        temporary.replace(path)
        paths.append(str(path))
        if writer is not None:
            with writer.as_default():
                tf.summary.image(f"records/{sample['region'].decode()}/{name[:-4]}", panels[None], step=0,
                                 description=" | ".join(preview_titles(band_names)))
    if writer is not None:
        writer.close()
    return paths
