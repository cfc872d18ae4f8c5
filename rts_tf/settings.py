"""Settings of the two long jobs: what defines a records build and a training run (defaults live here).

A light module (no TensorFlow, no GDAL): the command line reads its defaults from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from rts_tf.bands import BAND_NAMES
from rts_tf.errors import InputError
from rts_tf.records import COMPRESSIONS
from rts_tf.tiling import check_tiling

SCHEDULES = ("constant", "step", "exponential", "cosine")
VAL_SPLITS = ("auto", "scenes", "blocks")
# ArcticDEM's nodata is -9999; files without a declared nodata would let it in as elevation.
DEM_MIN_VALID = -1000.0
# --sensor generic: reflectance = DN * scale + offset unless --reflectance-scale/--reflectance-offset say otherwise
# (the common convention of surface-reflectance products: reflectance x 10000 in integers).
GENERIC_REFLECTANCE_SCALE = 1e-4
GENERIC_REFLECTANCE_OFFSET = 0.0


@dataclass(frozen=True)
class SensorSettings:
    """Which sensor profile reads the scenes (rts_tf.sensors.SENSORS) and the generic profile's options;
    None everywhere means: detect the sensor from the files."""

    sensor: str | None = None
    band_map: str | dict | None = None  # "blue=1,green=2,red=3,nir=4" (generic)
    reflectance_scale: float | None = None  # generic; default GENERIC_REFLECTANCE_SCALE
    reflectance_offset: float | None = None  # generic; default GENERIC_REFLECTANCE_OFFSET
    mask: str | None = None  # generic: a quality raster of one scene
    mask_ignore: tuple[int, ...] | None = None  # its values that make a pixel ignored


@dataclass(frozen=True)
class BuildSettings:
    """Everything that changes the content of records; a folder is built with one set of these."""

    tile_size: int = 256
    overlap: int = 25
    max_ignored: float = 0.5
    compression: str = "none"
    compression_level: int = 1
    rel_elevation_radius: float = 100.0
    all_touched: bool = False
    dem_min_valid: float = DEM_MIN_VALID
    bands: tuple[str, ...] = tuple(BAND_NAMES)  # the band set the records hold (canonical order)

    def validate(self) -> None:
        check_tiling(self.tile_size, self.overlap)
        if not self.bands or [name for name in BAND_NAMES if name in self.bands] != list(self.bands):
            raise InputError(f"--bands must name bands of {', '.join(BAND_NAMES)} in this order, got "
                             f"{', '.join(self.bands) or 'none'}")
        if self.tile_size % 32:
            nearest = " or ".join(str(size) for size in sorted({max(32, self.tile_size // 32 * 32),
                                                                  self.tile_size // 32 * 32 + 32}))
            raise InputError(f"--tile-size must be a multiple of 32, got {self.tile_size}: the model encoders "
                             f"downsample tiles 32 times, so no model could train on these records (try {nearest})")
        if not 0.0 <= self.max_ignored <= 1.0:
            raise InputError(f"--max-ignored must be between 0 and 1, got {self.max_ignored}")
        if self.compression not in COMPRESSIONS:
            raise InputError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression}")
        if not 0 <= self.compression_level <= 9:
            raise InputError(f"--compression-level must be 0 to 9, got {self.compression_level}")
        if self.rel_elevation_radius <= 0:
            raise InputError(f"--rel-elevation-radius must be positive, got {self.rel_elevation_radius}")



@dataclass
class FitConfig:
    """Everything that defines a training run; YAML files and command-line flags set these keys."""

    records: str = ""
    logdir: str = ""
    arch: str = "unetpp"
    encoder: str = "resnet34"
    encoder_weights: str | None = None
    decoder_filters: list[int] | None = None
    deep_supervision: bool = False
    output_stride: int = 16  # deeplabv3/deeplabv3plus only: 16 or 8 (dilated encoder); others ignore it
    epochs: int = 100
    batch_size: int = 8
    global_batch_size: int | None = None
    holdout_region: str | None = None
    train_regions: list[str] | None = None
    val_regions: list[str] | None = None
    val_split: str = "auto"
    val_fraction: float = 0.15
    validate_on_training_data: bool = False
    test_curves: bool = True
    loss: str = "focal"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    schedule_step_epochs: int = 30
    schedule_decay: float = 0.1
    early_stopping: int = 0
    seed: int = 0
    bands: list[str] | None = None  # a subset of the records' bands to train on (None: all of them)
    augment: bool = True
    augment_on: str = "device"  # "device": in the training step (the accelerator); "host": in tf.data
    oversample_slumps: int = 1
    cache: bool = False
    shuffle_buffer: int = 256
    mixed_precision: bool = False
    xla: bool = False
    devices: list[str] | None = None
    logical_cpus: int = 0
    image_every: int = 5
    image_tiles: int = 4
    profile: bool = False
    steps_per_epoch: int | None = None
    deterministic: bool = True
    bn_momentum: float | None = None  # the encoder's own (0.99) unless set

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}


# How a run is executed, not what it computes: changing these does not make a run another run (it
# resumes), while any other FitConfig field, or other records content, does.
RUNTIME_OPTIONS = ("logdir", "records", "devices", "logical_cpus", "image_every", "image_tiles", "profile", "cache",
                   "deterministic", "augment_on")
