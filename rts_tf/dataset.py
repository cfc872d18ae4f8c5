"""Input pipeline: records chosen by region -> tf.data (interleave, parse, augment, batch, prefetch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from rts_tf.errors import InputError
from rts_tf.records import BandStatistics, decode_example, verify_shard

AUTOTUNE = tf.data.AUTOTUNE


@dataclass(frozen=True)
class RegionSplit:
    """Which regions train and which validate."""

    train: tuple[str, ...]
    validation: tuple[str, ...]


def split_regions(manifest: dict, holdout_region: str | None = None, train_regions=None,
                  val_regions=None) -> RegionSplit:
    """Training and validation regions: hold one region out (the paper's cross-validation), or
    explicit lists; with neither, every region trains and validates."""
    known = list(manifest["regions"])
    for name in [holdout_region, *(train_regions or ()), *(val_regions or ())]:
        if name is not None and name not in known:
            raise InputError(f"region '{name}' is not in the records (regions: {', '.join(known)})")
    if holdout_region is not None:
        validation = [holdout_region]
        train = [r for r in (train_regions or known) if r != holdout_region]
    else:
        train = list(train_regions or known)
        validation = list(val_regions or ([r for r in known if r not in train] or known))
    if not train:
        raise InputError("no training regions left (the held-out region is the only one in the records)")
    return RegionSplit(tuple(train), tuple(validation))


def shards_of(manifest: dict, regions, records: str | Path, verify: bool = True) -> list[str]:
    """Paths of the shards of some regions, from the manifest alone; checksums verified."""
    chosen = sorted(path for path, info in manifest["shards"].items() if info["region"] in regions and info["tiles"])
    if verify:
        for path in chosen:
            problem = verify_shard(Path(records), path, manifest["shards"][path])
            if problem:
                raise InputError(problem)
    return [str(Path(records) / path) for path in chosen]


def tile_count(manifest: dict, regions) -> tuple[int, int]:
    """(tiles, tiles with slumps) in some regions."""
    scenes = [s for s in manifest["scenes"] if s["region"] in regions]
    return sum(s["tiles"] for s in scenes), sum(s["slump_tiles"] for s in scenes)


def normalisation(manifest: dict, regions) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and standard deviation over the given regions' valid pixels."""
    combined = BandStatistics(len(manifest["bands"]))
    for region in regions:
        combined.merge(BandStatistics.from_dict(manifest["statistics"]["regions"][region]))
    stats = combined.to_dict()
    return np.array(stats["mean"], dtype=np.float32), np.maximum(np.array(stats["std"], dtype=np.float32), 1e-6)


def make_dataset(records: str | Path, manifest: dict, regions, batch_size: int, training: bool,
                 seed: int = 0, augment_settings=None, oversample_slumps: int = 1, cache: bool = False,
                 shuffle_buffer: int = 256, verify: bool = True) -> tf.data.Dataset:
    """Batches of (image float32 (B,H,W,C) in physical units, label uint8 (B,H,W,1), 255 = ignore).

    Training data is shuffled (shards and tiles), optionally oversamples tiles with slumps
    (each repeated `oversample_slumps` times per epoch), is augmented when augment_settings is
    given, and drops the last incomplete batch so every replica gets equal batches.
    """
    paths = shards_of(manifest, regions, records, verify)
    if not paths:
        raise InputError(f"{records}: no tiles in the regions {', '.join(regions)}")
    band_names = [band["name"] for band in manifest["bands"]]
    files = tf.data.Dataset.from_tensor_slices(paths)
    if training:
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    dataset = files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type=manifest["compression"]),
        cycle_length=min(len(paths), 8), num_parallel_calls=AUTOTUNE, deterministic=True)
    dataset = dataset.map(lambda s: decode_example(s, manifest, keep_dtype=True), num_parallel_calls=AUTOTUNE)
    dataset = dataset.map(lambda s: {"image": s["image"], "label": s["label"], "slumps": s["slump_pixels"]},
                          num_parallel_calls=AUTOTUNE)
    if cache:
        dataset = dataset.cache()
    if training and oversample_slumps > 1:
        dataset = dataset.flat_map(lambda s: tf.data.Dataset.from_tensors(s).repeat(
            tf.where(s["slumps"] > 0, tf.constant(oversample_slumps, tf.int64), tf.constant(1, tf.int64))))
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(lambda s: (tf.cast(s["image"], tf.float32), s["label"]), num_parallel_calls=AUTOTUNE)
    if training and augment_settings is not None:
        from rts_tf.augment import augment

        seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda pair, s: augment(pair[0], pair[1], s, band_names, augment_settings), num_parallel_calls=AUTOTUNE)
    return dataset.batch(batch_size, drop_remainder=training, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
