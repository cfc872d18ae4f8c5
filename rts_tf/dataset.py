"""Input pipeline: records chosen by region -> tf.data (interleave, parse, batch, augment, prefetch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from rts_tf.errors import InputError
from rts_tf.records import IGNORE, BandStatistics, decode_example, image_float32, verify_shard
from rts_tf.settings import VAL_SPLITS
from rts_tf.tiling import tile_offsets

AUTOTUNE = tf.data.AUTOTUNE


@dataclass(frozen=True)
class Selection:
    """Tiles of some scenes: all of each scene's tiles, or only the grid positions listed for it."""

    scenes: tuple[str, ...]
    positions: dict = field(default_factory=dict)  # scene_id -> frozenset of (row, col) kept

    def shards(self, manifest: dict) -> list[str]:
        chosen = set(self.scenes)
        return sorted(path for scene in manifest["scenes"] if scene["scene_id"] in chosen
                      for path in scene["shards"] if manifest["shards"][path]["tiles"])

    def tile_count(self, manifest: dict) -> tuple[int, int]:
        """(tiles, tiles with slumps), exact where the manifest lists its tiles' positions."""
        tiles = slumps = 0.0
        for scene in manifest["scenes"]:
            if scene["scene_id"] not in self.scenes:
                continue
            if scene["scene_id"] not in self.positions:
                tiles += scene["tiles"]
                slumps += scene["slump_tiles"]
                continue
            kept = self.positions[scene["scene_id"]] & kept_positions(manifest, scene)
            with_slumps = slump_positions(manifest, scene)
            tiles += len(kept)
            slumps += len(kept & with_slumps) if with_slumps is not None else \
                scene["slump_tiles"] * len(kept) / max(scene["tiles"], 1)
        return int(round(tiles)), int(round(slumps))

    def slump_pixels(self, manifest: dict) -> int | None:
        """Slump pixels in the selected tiles (a pixel of overlapping tiles counts in each), or None
        when the manifest does not list them (records from before tile positions carried counts)."""
        total = 0
        for scene in manifest["scenes"]:
            if scene["scene_id"] not in self.scenes:
                continue
            positions = scene.get("positions")
            if positions is None or any(len(position) < 3 for position in positions):
                return None
            kept = self.positions.get(scene["scene_id"])
            total += sum(int(p[2]) for p in positions if kept is None or (int(p[0]), int(p[1])) in kept)
        return total


@dataclass(frozen=True)
class DataSplit:
    """Which tiles train, which validate (model selection) and which test (the held-out region)."""

    method: str  # "scenes", "blocks", "regions" (--val-regions) or "training data" (explicitly asked)
    train_regions: tuple[str, ...]
    train: Selection
    validation: Selection
    test: Selection | None = None
    test_region: str | None = None
    validation_regions: tuple[str, ...] = ()

    stratified: bool = False  # drawn again by slump content: the first draw held no slump pixel

    def describe(self, manifest: dict | None = None) -> str:
        """What validates, and (with the manifest) how many tiles and slump pixels it holds."""
        again = ", drawn by slump content" if self.stratified else ""
        if self.method == "scenes":
            text = f"validation: {len(self.validation.scenes)} whole scenes of the training regions{again} " \
                   f"({', '.join(self.validation.scenes)})"
        elif self.method == "blocks":
            text = f"validation: an edge strip of tiles in each of {len(self.validation.positions)} training " \
                   f"scenes{again}, one tile row or column between it and the training tiles"
        elif self.method == "regions":
            text = f"validation: the regions {', '.join(self.validation_regions)}"
        else:
            text = "validation: the training data itself (--validate-on-training-data); scores are not independent"
        if manifest is not None:
            pixels = self.validation.slump_pixels(manifest)
            text += f"; {self.validation.tile_count(manifest)[0]} tiles" + \
                (f", {pixels:,} slump pixels" if pixels is not None else "")
        return text

    def summary(self, manifest: dict) -> dict:
        """What run.json records: the method, the scenes of each part, the tiles held out for validation."""
        part = lambda selection: None if selection is None else {
            "scenes": list(selection.scenes), "shards": selection.shards(manifest),
            "tiles": selection.tile_count(manifest)[0],
            "positions": {scene: sorted(map(list, kept)) for scene, kept in sorted(selection.positions.items())}}
        return {"method": self.method, "train_regions": list(self.train_regions), "test_region": self.test_region,
                "validation_regions": list(self.validation_regions),
                "train": part(self.train), "validation": part(self.validation), "test": part(self.test),
                "slump_pixels": {"train": self.train.slump_pixels(manifest),
                                 "validation": self.validation.slump_pixels(manifest)},
                "stratified": self.stratified, "description": self.describe(manifest)}


def scenes_of(manifest: dict, regions) -> list[dict]:
    return [scene for scene in manifest["scenes"] if scene["region"] in regions and scene["tiles"]]


def grid_positions(manifest: dict, scene: dict) -> list[tuple[int, int]]:
    """Every tile position (row, col) of a scene's grid (kept or dropped at build time)."""
    size, overlap = manifest["tile_size"], manifest["overlap"]
    return [(row, col) for row in tile_offsets(scene["height"], size, overlap)
            for col in tile_offsets(scene["width"], size, overlap)]


def kept_positions(manifest: dict, scene: dict) -> set[tuple[int, int]]:
    """The positions of the tiles a scene's shards hold (records from before the manifest listed
    them: every grid position)."""
    if "positions" in scene:
        return {(int(position[0]), int(position[1])) for position in scene["positions"]}
    return set(grid_positions(manifest, scene))


def slump_positions(manifest: dict, scene: dict) -> set[tuple[int, int]] | None:
    """The positions of a scene's tiles with slump pixels, when the manifest lists them."""
    if "positions" not in scene or any(len(position) < 3 for position in scene["positions"]):
        return None
    return {(int(row), int(col)) for row, col, slump_pixels in scene["positions"] if slump_pixels}


def split_data(manifest: dict, holdout_region: str | None = None, train_regions=None, val_regions=None,
               method: str = "auto", fraction: float = 0.15, seed: int = 0,
               validate_on_training_data: bool = False) -> DataSplit:
    """Split records into training, validation and test data, with validation that holds slump pixels.

    A validation set without slump pixels cannot select anything (its IoU is 0 at every epoch and
    threshold): `auto` then draws again, stratified by slump content (`stratified_split`); a
    split the user chose (--val-regions, --val-split scenes or blocks) is refused, naming its scenes.
    See `draw_split` for the split itself.
    """
    split = draw_split(manifest, holdout_region, train_regions, val_regions, method, fraction, seed,
                       validate_on_training_data)
    if split.validation.slump_pixels(manifest) != 0 or not split.train.slump_pixels(manifest):
        return split  # slumps to select on (or counts unknown), or no slumps to learn at all
    if method == "auto" and not val_regions and not validate_on_training_data:
        stratified = stratified_split(manifest, split, fraction, seed)
        if stratified is not None:
            return stratified
        raise InputError("no validation split of the training regions holds slump pixels: every slump is in one "
                         "scene strip that training needs; give --val-regions or more labelled scenes")
    chosen = "--val-regions " + ",".join(val_regions) if val_regions else f"--val-split {method}"
    raise InputError(f"the validation data of {chosen} holds no slump pixel (scenes: "
                     f"{', '.join(split.validation.scenes)}): no checkpoint or threshold could be selected on it; "
                     "choose other validation data or --val-split auto")


def stratified_split(manifest: dict, first: DataSplit, fraction: float, seed: int) -> DataSplit | None:
    """A split whose validation holds slump pixels, or None: whole scenes drawn separately from the
    scenes with slumps and those without (round(fraction x n) of each kind, at least one scene
    with slumps, always leaving training a scene with slumps), else edge strips whose sides are
    chosen among those that hold slumps."""
    scenes = scenes_of(manifest, first.train_regions)
    with_slumps = sorted(s["scene_id"] for s in scenes if s.get("slump_pixels"))
    without = sorted(s["scene_id"] for s in scenes if not s.get("slump_pixels"))
    rng = np.random.default_rng([seed, 7])
    if len(with_slumps) >= 2:
        count = min(max(1, round(fraction * len(with_slumps))), len(with_slumps) - 1)
        chosen = set(rng.choice(with_slumps, size=count, replace=False).tolist())
        if without:
            chosen.update(rng.choice(without, size=min(round(fraction * len(without)), len(without)),
                                     replace=False).tolist())
        tiles = sum(s["tiles"] for s in scenes)
        if sum(s["tiles"] for s in scenes if s["scene_id"] in chosen) <= 2 * fraction * tiles:
            return DataSplit("scenes", first.train_regions,
                             Selection(tuple(s["scene_id"] for s in scenes if s["scene_id"] not in chosen)),
                             Selection(tuple(s["scene_id"] for s in scenes if s["scene_id"] in chosen)),
                             first.test, first.test_region, stratified=True)
    try:
        blocks = block_split(manifest, scenes, first.train_regions, fraction, seed, first.test, first.test_region,
                             prefer_slumps=True)
    except InputError:
        return None
    if blocks.validation.slump_pixels(manifest) and blocks.train.slump_pixels(manifest):
        return DataSplit(**{**blocks.__dict__, "stratified": True})
    return None


def draw_split(manifest: dict, holdout_region: str | None = None, train_regions=None, val_regions=None,
               method: str = "auto", fraction: float = 0.15, seed: int = 0,
               validate_on_training_data: bool = False) -> DataSplit:
    """Split records into training, validation and test data.

    The held-out region is the test set: nothing that chooses (checkpoint, early stopping,
    threshold) sees it. Validation comes from the training regions: whole scenes (about `fraction`
    of each region's scenes, at least one where a region has two or more), or an edge strip of
    tiles in every training scene with a one-tile buffer so that no pixel is in both parts; `auto`
    takes scenes unless they would take more than twice the fraction of the tiles. --val-regions
    validates on whole regions instead.
    """
    known = list(manifest["regions"])
    for name in [holdout_region, *(train_regions or ()), *(val_regions or ())]:
        if name is not None and name not in known:
            raise InputError(f"region '{name}' is not in the records (regions: {', '.join(known)})")
    if method not in VAL_SPLITS:
        raise InputError(f"--val-split must be one of {', '.join(VAL_SPLITS)}, got {method}")
    if not 0.0 < fraction < 1.0:
        raise InputError(f"--val-fraction must be between 0 and 1, got {fraction}")
    if holdout_region is not None and holdout_region in (val_regions or ()):
        raise InputError(f"the held-out region '{holdout_region}' is the test set; it cannot validate")
    candidates = [r for r in (train_regions or known) if r != holdout_region]
    test = Selection(tuple(s["scene_id"] for s in scenes_of(manifest, [holdout_region]))) if holdout_region else None
    if validate_on_training_data:
        train = tuple(candidates)
        if not train:
            raise InputError("no training regions left (the held-out region is the only one in the records)")
        everything = Selection(tuple(s["scene_id"] for s in scenes_of(manifest, train)))
        return DataSplit("training data", train, everything, everything, test, holdout_region)
    if val_regions:
        overlap = sorted(set(val_regions) & set(train_regions or ()))
        if overlap:
            raise InputError(f"the region(s) {', '.join(overlap)} would both train and validate; the validation "
                             "scores would not be independent (add --validate-on-training-data to do it anyway)")
        train = tuple(r for r in candidates if r not in val_regions)
        if not train:
            raise InputError("no training regions left once the validation and held-out regions are set aside")
        return DataSplit("regions", train, Selection(tuple(s["scene_id"] for s in scenes_of(manifest, train))),
                         Selection(tuple(s["scene_id"] for s in scenes_of(manifest, val_regions))),
                         test, holdout_region, tuple(val_regions))
    train = tuple(candidates)
    if not train:
        raise InputError("no training regions left (the held-out region is the only one in the records)")
    scenes = scenes_of(manifest, train)
    by_scenes = scene_split(scenes, fraction, seed)
    tiles = sum(s["tiles"] for s in scenes)
    validation_tiles = sum(s["tiles"] for s in scenes if s["scene_id"] in by_scenes)
    if method == "scenes" or (method == "auto" and 0 < validation_tiles <= 2 * fraction * tiles):
        if not by_scenes:
            raise InputError("--val-split scenes needs a training region with at least two scenes; "
                             "use --val-split blocks")
        return DataSplit("scenes", train,
                         Selection(tuple(s["scene_id"] for s in scenes if s["scene_id"] not in by_scenes)),
                         Selection(tuple(s["scene_id"] for s in scenes if s["scene_id"] in by_scenes)),
                         test, holdout_region)
    return block_split(manifest, scenes, train, fraction, seed, test, holdout_region)


def scene_split(scenes: list[dict], fraction: float, seed: int) -> set[str]:
    """Scene ids drawn for validation: round(fraction x n) of each region's n scenes, at least one
    where n >= 2, by a generator seeded with `seed` (the same seed draws the same scenes)."""
    chosen: set[str] = set()
    regions = sorted({s["region"] for s in scenes})
    for index, region in enumerate(regions):
        ids = sorted(s["scene_id"] for s in scenes if s["region"] == region)
        if len(ids) < 2:
            continue
        count = min(max(1, round(fraction * len(ids))), len(ids) - 1)
        rng = np.random.default_rng([seed, index])
        chosen.update(rng.choice(ids, size=count, replace=False).tolist())
    return chosen


def block_split(manifest: dict, scenes: list[dict], train_regions: tuple[str, ...], fraction: float, seed: int,
                test: Selection | None, test_region: str | None, prefer_slumps: bool = False) -> DataSplit:
    """Validation from an edge strip of tiles of every training scene, with a buffer of tiles
    that would share pixels with both parts left out of either.

    The strip holds the `fraction` of the scene's lines of tiles (rows or columns, at least one)
    nearest to one edge, counting only lines that hold tiles; the edge is drawn with `seed`
    (another is tried when a side would leave no training tiles). The buffer is the next
    line(s) of tiles, as many as still overlap the strip. prefer_slumps: in each scene, the sides
    whose strip holds slump pixels (and leaves training some) are tried first.
    """
    size, overlap = manifest["tile_size"], manifest["overlap"]
    buffer = math.ceil(size / (size - overlap)) - 1  # neighbours this many lines away still share pixels
    train_positions, validation_positions = {}, {}
    for index, scene in enumerate(sorted(scenes, key=lambda s: s["scene_id"])):
        kept = kept_positions(manifest, scene)
        rng = np.random.default_rng([seed, index])
        slumps = slump_positions(manifest, scene) or set()
        candidates = []
        for side in rng.permutation(4):  # top, bottom, left, right
            axis = 0 if side < 2 else 1
            lines = sorted({position[axis] for position in kept}, reverse=bool(side % 2))
            offsets = sorted({position[axis] for position in grid_positions(manifest, scene)},
                             reverse=bool(side % 2))
            strip = max(1, round(fraction * len(lines)))
            if len(lines) <= strip:
                continue
            last = offsets.index(lines[strip - 1])  # the strip's innermost line, counted from the edge
            validation = {p for p in kept if offsets.index(p[axis]) <= last}
            training = {p for p in kept if offsets.index(p[axis]) > last + buffer}
            if validation and training:
                candidates.append((validation, training))
        if prefer_slumps:  # a stable sort: the drawn order among sides of the same kind
            candidates.sort(key=lambda parts: not (parts[0] & slumps and parts[1] & slumps))
        if candidates:
            validation_positions[scene["scene_id"]] = frozenset(candidates[0][0])
            train_positions[scene["scene_id"]] = frozenset(candidates[0][1])
    if not validation_positions:
        raise InputError(f"the training scenes are too small to split into validation and training blocks "
                         f"({buffer + 2} lines of tiles are needed); give --val-regions or more data")
    ids = tuple(s["scene_id"] for s in scenes)
    return DataSplit("blocks", train_regions, Selection(ids, train_positions),
                     Selection(tuple(validation_positions), validation_positions), test, test_region)


def check_shards(manifest: dict, paths, records: str | Path, verify: bool = False) -> None:
    """Check shards against the manifest by size or, with verify, by checksum; name all problems at once."""
    problems = [problem for path in paths
                if (problem := verify_shard(Path(records), path, manifest["shards"][path], full=verify))]
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise InputError(f"{problems[0]}{more}")


def normalisation(manifest: dict, regions) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and standard deviation over the given regions' valid pixels."""
    combined = BandStatistics(len(manifest["bands"]))
    for region in regions:
        combined.merge(BandStatistics.from_dict(manifest["statistics"]["regions"][region]))
    stats = combined.to_dict()
    return np.array(stats["mean"], dtype=np.float32), np.maximum(np.array(stats["std"], dtype=np.float32), 1e-6)


def make_dataset(records: str | Path, manifest: dict, data, batch_size: int, training: bool,
                 seed: int = 0, augment_settings=None, oversample_slumps: int = 1, cache: bool = False,
                 shuffle_buffer: int = 256, verify: bool = False, mean=None, pad_batches: bool = False,
                 epochs: tuple[int, int] | None = None, augment_on: str = "host") -> tf.data.Dataset:
    """Batches of (image float32 (B,H,W,C) in physical units, label uint8 (B,H,W,1), 255 = ignore).

    `data` is a Selection or a list of region names. Training data is shuffled (shards and
    tiles), optionally oversamples tiles with slumps (each repeated `oversample_slumps` times per
    epoch), is augmented when augment_settings is given (about the band means `mean`, see
    augment.py) here or, with augment_on "device", in the training step (`AugmentingModel`): the
    batches are then (image, label, seeds int64 (B, 2)), each tile's seed the one the host would
    have augmented it with. Training data drops the last incomplete batch so every replica gets
    equal batches; evaluation data with pad_batches fills its last batch up with ignored tiles instead.

    With `epochs=(first, stop)` training data is one stream of the epochs first..stop-1 in which
    every epoch's order and augmentation are a function of (seed, epoch) alone: a run resumed at
    epoch k sees exactly what an uninterrupted run sees from epoch k on. Without it, the order is
    reshuffled at each pass (for --steps-per-epoch and plain iteration).
    """
    selection = data if isinstance(data, Selection) else \
        Selection(tuple(s["scene_id"] for s in scenes_of(manifest, data)))
    shard_names = selection.shards(manifest)
    check_shards(manifest, shard_names, records, verify)
    paths = [str(Path(records) / path) for path in shard_names]
    if not paths:
        raise InputError(f"{records}: no tiles in the scenes or regions chosen")
    band_names = [band["name"] for band in manifest["bands"]]

    def tiles(files: tf.data.Dataset) -> tf.data.Dataset:
        dataset = files.interleave(
            lambda path: tf.data.TFRecordDataset(path, compression_type=manifest["compression"]),
            cycle_length=min(len(paths), 8), num_parallel_calls=AUTOTUNE, deterministic=True)
        dataset = dataset.map(lambda s: decode_example(s, manifest, keep_dtype=True), num_parallel_calls=AUTOTUNE)
        if selection.positions:
            dataset = dataset.filter(position_filter(selection))
        return dataset.map(lambda s: {"image": s["image"], "label": s["label"], "slumps": s["slump_pixels"]},
                           num_parallel_calls=AUTOTUNE)

    def finish(dataset: tf.data.Dataset, seeds: tf.data.Dataset) -> tf.data.Dataset:
        """Oversample, batch, then convert to float32 and augment whole batches in one map, each
        tile with its own seed from `seeds`."""
        if training and oversample_slumps > 1:
            dataset = dataset.flat_map(lambda s: tf.data.Dataset.from_tensors(s).repeat(
                tf.where(s["slumps"] > 0, tf.constant(oversample_slumps, tf.int64), tf.constant(1, tf.int64))))
        if training:
            dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=epochs is None)
        augmenting = training and augment_settings is not None
        if augmenting:
            from rts_tf.augment import augment_batch

            centre = tf.constant(np.zeros(len(band_names)) if mean is None else mean, tf.float32)
            dataset = tf.data.Dataset.zip((dataset, seeds))

        # One XLA kernel instead of a cast, a scale and a concatenation pass per stored part: half
        # the CPU time per tile, bit for bit the same (float32 casts and products with the same scales).
        convert = tf.function(lambda parts: image_float32(parts, manifest), jit_compile=True)

        def to_float(sample, tile_seeds=None):
            image = convert(sample["image"])
            if not augmenting:
                return image, sample["label"]
            if augment_on == "device":
                return image, sample["label"], tf.cast(tile_seeds, tf.int64)
            return augment_batch(image, sample["label"], tile_seeds, band_names, augment_settings, centre)

        return dataset.batch(batch_size, drop_remainder=training, num_parallel_calls=AUTOTUNE).map(
            to_float, num_parallel_calls=AUTOTUNE)

    files = tf.data.Dataset.from_tensor_slices(paths)
    if training and epochs is not None:
        cached = tiles(files).cache() if cache else None
        tile_total = max(selection.tile_count(manifest)[0], 1)

        def one_epoch(epoch):
            key = tf.stack([tf.constant(seed, tf.int64), epoch])
            if cached is None:
                order = tf.random.experimental.stateless_shuffle(tf.constant(paths), seed=key)
                dataset = tiles(tf.data.Dataset.from_tensor_slices(order))
            else:  # a cached stream keeps its order: start it at a different place each epoch
                start = tf.random.stateless_uniform([], key, 0, tile_total, dtype=tf.int64)
                dataset = cached.skip(start).concatenate(cached.take(start))
            seeds = tf.data.Dataset.range(2 ** 62).map(
                lambda index: tf.stack([tf.constant(seed, tf.int64) * 1_000_003 + epoch, index]))
            return finish(dataset, seeds)

        return tf.data.Dataset.range(*epochs).flat_map(one_epoch).prefetch(AUTOTUNE)
    if training:
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    dataset = tiles(files)
    if cache:
        dataset = dataset.cache()
    dataset = finish(dataset, tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True))
    if pad_batches and not training:
        # With several replicas a short last batch can leave one of them without a tile, which
        # Keras cannot evaluate; ignored tiles fill it up and count in no metric.
        def pad(image, label):
            missing = batch_size - tf.shape(image)[0]
            return (tf.pad(image, [[0, missing], [0, 0], [0, 0], [0, 0]]),
                    tf.pad(label, [[0, missing], [0, 0], [0, 0], [0, 0]], constant_values=IGNORE))

        dataset = dataset.map(pad, num_parallel_calls=AUTOTUNE)
    return dataset.prefetch(AUTOTUNE)


def position_filter(selection: Selection):
    """A tf.data predicate keeping a sample when its scene is whole in the selection or its (row,
    col) is one of the positions kept for its scene."""
    keys = [f"{scene}/{row}/{col}" for scene, kept in selection.positions.items() for row, col in kept]
    whole = [scene for scene in selection.scenes if scene not in selection.positions]
    tiles = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(keys or ["-"], tf.string), tf.ones(max(len(keys), 1), tf.int64)), default_value=0)
    scenes = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(whole or ["-"], tf.string), tf.ones(max(len(whole), 1), tf.int64)), default_value=0)

    def keep(sample):
        key = tf.strings.join([sample["scene_id"], tf.strings.as_string(sample["row"]),
                               tf.strings.as_string(sample["col"])], separator="/")
        return tf.logical_or(tiles.lookup(key) > 0, scenes.lookup(sample["scene_id"]) > 0)

    return keep
