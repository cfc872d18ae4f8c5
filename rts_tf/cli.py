"""Command line: parses options and calls one library function per command."""

from __future__ import annotations

import importlib
import os
import signal
import sys

import click

from rts_tf import __version__
from rts_tf.engine import ENGINES
from rts_tf.errors import InputError, disk_problem, output_error, terminate_like_interrupt, terminated
from rts_tf.sensors import SENSORS
from rts_tf.settings import GENERIC_REFLECTANCE_OFFSET, GENERIC_REFLECTANCE_SCALE, BuildSettings, FitConfig, SensorSettings


FIT, BUILD = FitConfig(), BuildSettings()  # option defaults come from the settings classes


class TableChoice(click.Choice):
    """A choice among the names of one of the library's tables (architectures, losses, ...),
    imported only when a value is checked or help is shown, so start-up stays fast."""

    def __init__(self, module: str, table: str):
        self.module, self.table, self.case_sensitive = module, table, True

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(self.module), self.table))


class Commands(click.Group):
    """A group whose commands report a user's mistakes as one line, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            with terminate_like_interrupt():
                return super().invoke(ctx)
        except KeyboardInterrupt:
            if not terminated.is_set():
                raise  # Ctrl-C: click says "Aborted!"
            error = click.ClickException("terminated (SIGTERM); finished work is kept: run the same command again "
                                         "to resume")
            error.exit_code = 128 + signal.SIGTERM  # as a shell reports a process ended by SIGTERM
            raise error from None
        except InputError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:
            if disk_problem(error) is None:
                raise
            raise click.ClickException(str(output_error(error.filename or "output", error))) from None


def load_config_defaults(ctx: click.Context, param: click.Parameter, value):
    """Eager --config: its keys become the command's defaults, so flags still override them."""
    if value is None:
        return None
    from rts_tf.config import load_config

    allowed = {p.name for p in ctx.command.params if p.name not in ("config", "help")}
    try:
        config = load_config(value, allowed)
    except InputError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None
    ctx.default_map = {**(ctx.default_map or {}), **config}
    return value


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
    callback=load_config_defaults,
    help="YAML file whose keys are this command's option names; flags given here override it.")


def sensor_options(command):
    """The options that choose how scene files are read (rts_tf.sensors), shared by build-records and predict;
    the command gets them as keyword arguments for SensorSettings."""
    options = [
        click.option("--sensor", default=None, metavar="NAME",
                     help=f"Sensor profile: {', '.join(SENSORS)} (default: detected from the files; the summary "
                          "says which). Each maps its bands, reflectance and quality mask onto the canonical bands."),
        click.option("--band-map", default=None, metavar="BAND=N,...",
                     help="--sensor generic: the file band of each canonical band, e.g. blue=1,green=2,red=3,nir=4."),
        click.option("--reflectance-scale", type=float, default=None,
                     help=f"--sensor generic: reflectance = DN * scale + offset [default: {GENERIC_REFLECTANCE_SCALE:g}]."),
        click.option("--reflectance-offset", type=float, default=None,
                     help=f"--sensor generic: the offset of that conversion [default: {GENERIC_REFLECTANCE_OFFSET:g}]."),
        click.option("--mask", type=click.Path(), default=None,
                     help="--sensor generic: a quality raster of the (one) scene, on any grid (read nearest)."),
        click.option("--mask-ignore", multiple=True, callback=lambda *args: split_integers(*args),
                     help="--sensor generic: the --mask values that make a pixel ignored, e.g. 0,3,8."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def progress_bar(description: str, unit: str = "tile"):
    """A tqdm bar driven by progress(done, total) callbacks; returns (callback, close)."""
    from tqdm import tqdm

    bar = tqdm(desc=description, unit=unit, dynamic_ncols=True, disable=None, file=sys.stderr)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rts-tf")
def main() -> None:
    """rts-tf: map retrogressive thaw slumps (RTS) from PlanetScope (4- and 8-band), Sentinel-2 L2A
    or any band-mapped imagery, a DEM and TCVIS with Keras/TensorFlow (after Nitze et al. 2021,
    Remote Sensing 13:4294).

    Typical order: demo-data (or your own scenes) -> build-records -> inspect -> fit ->
    evaluate / crossval -> predict; export makes a trained run portable (ONNX, SavedModel).
    """
    # TensorFlow's C++ start-up log lines are noise for a command-line user.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # oneDNN CPU kernels (read once, when TensorFlow is imported, which every command does later):
    # TensorFlow 2.15 turns them on by itself only on CPUs with AVX512-VNNI, AVX-VNNI or AMX. A UNet
    # or UNet++ training step took 2.2-2.4x less CPU with them than with TensorFlow's own kernels,
    # also with oneDNN limited to plain AVX-512 (ONEDNN_MAX_CPU_ISA=AVX512_CORE), and 1.2-1.3x less
    # limited to AVX2; DeepLab's dilated convolutions need them (rts_tf.models.blocks.AtrousConv2D).
    # A value the user set, such as 0, is kept.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


@main.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same seed gives the same files.")
@click.option("--scene-size", type=click.IntRange(64, 4096), default=None,
              help="Scene width/height in pixels (about 640 by default).")
@click.option("--time-series", is_flag=True, default=False,
              help="Also write OUT/timeseries: one site (Peel) imaged on four dates, with slumps that grow, merge, "
                   "appear, stop and hide under a cloud, for `rts-tf track` (always at full scene size; its "
                   "folders are apart from the training data's).")
def demo_data(out: str, seed: int, scene_size: int | None, time_series: bool) -> None:
    """Write a small synthetic dataset in the real formats to OUT.

    Seven regions (the paper's six and Yamal) of three sensors: PlanetScope 4-band scenes with UDM2
    masks, and over Yamal an 8-band PlanetScope and a Sentinel-2 L2A scene of the same ground; an
    ArcticDEM-like DEM (EPSG:3413) and TCVIS (EPSG:4326) as per-region tiles, label polygons
    (labels.gpkg) and site polygons (sites.geojson).
    """
    from rts_tf.demo import make_demo_data

    summary = make_demo_data(out, seed=seed, scene_size=scene_size)
    click.echo(f"demo data: {out} ({len(summary['scenes'])} scenes in {len(summary['regions'])} regions, "
               f"{summary['slumps']} labelled slumps, {summary['bytes'] / 1e6:.1f} MB)")
    if time_series:
        from rts_tf.demo import make_time_series_data

        series = make_time_series_data(os.path.join(out, "timeseries"), seed=seed)
        click.echo(f"time series: {os.path.join(out, 'timeseries')} ({len(series['scenes'])} dates of one site, "
                   f"{series['labels']} labelled slumps, {series['bytes'] / 1e6:.1f} MB)")


@main.command("build-records")
@config_option
@click.option("--scenes", multiple=True, required=True, type=click.Path(),
              help="A scene folder or a folder of scene folders (repeatable).")
@click.option("--labels", required=True, type=click.Path(), help="Label polygons (GeoPackage, Shapefile, GeoJSON).")
@click.option("--dem", multiple=True, type=click.Path(),
              help="DEM: a file, a VRT or a folder of GeoTIFF tiles (repeatable).")
@click.option("--rel-elevation", multiple=True, type=click.Path(),
              help="Precomputed relative elevation (m) instead of --dem; needs --slope.")
@click.option("--slope", multiple=True, type=click.Path(), help="Precomputed slope (degrees) instead of --dem.")
@click.option("--tcvis", multiple=True, type=click.Path(),
              help="TCVIS (3-band uint8): a file, a VRT or a folder of tiles (repeatable); needed when --bands "
                   "has TCVIS bands.")
@click.option("--bands", "bands", default=None, callback=lambda *args: band_set(*args),
              help="The records' band set (default: all, the paper's ten): band names (blue, green, red, nir, ndvi, tcvis_brightness, "
                   "tcvis_greenness, tcvis_wetness, relative_elevation, slope) and groups (optical = "
                   "blue,green,red,nir,ndvi; reflectance; tcvis; terrain; all) joined by ',' or '+', e.g. "
                   "optical+terrain. Only the sources of these bands are needed (no --tcvis for optical+terrain).")
@click.option("--sites", type=click.Path(), default=None,
              help="Site polygons with 'site' and 'region' fields; else regions come from the labels.")
@click.option("--default-region", default=None,
              help="Region of scenes that no site polygon contains and whose labels carry no region "
                   "(without it such scenes are an error).")
@click.option("--label-field", default=None,
              help="Label field that holds the class, when the label file has several; needs --label-value.")
# (a lambda because split_list is defined further down)
@click.option("--label-value", "label_values", multiple=True, callback=lambda *args: split_list(*args),
              help="Value(s) of --label-field that mark a slump (comma-separated or repeated); "
                   "default: every polygon is a slump.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Records folder to write.")
@click.option("--tile-size", type=int, default=BUILD.tile_size,
              show_default=True, help="Tile width and height in pixels (a multiple of 32).")
@click.option("--overlap", type=int, default=BUILD.overlap,
              show_default=True, help="Overlap of neighbouring tiles in pixels.")
@click.option("--max-ignored", type=float, default=BUILD.max_ignored, show_default=True,
              help="Drop tiles with a larger share of ignored pixels (cloud, nodata, no DEM/TCVIS).")
@click.option("--rel-elevation-radius", type=float, default=BUILD.rel_elevation_radius, show_default=True,
              help="Radius (m) of the circle whose mean elevation is subtracted.")
@click.option("--dem-min-valid", type=float, default=BUILD.dem_min_valid, show_default=True,
              help="DEM values below this (m) are nodata, also where the DEM declares none (ArcticDEM: -9999).")
@click.option("--all-touched", is_flag=True, default=False,
              help="Burn every pixel a label touches (default: pixel centres inside, unbiased areas).")
@click.option("--compression", type=TableChoice("rts_tf.records", "COMPRESSIONS"), default=BUILD.compression,
              show_default=True)
@click.option("--compression-level", type=int, default=BUILD.compression_level,
              show_default=True, help="GZIP level 0-9.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Scenes built in parallel processes (--engine ray: the CPUs of an embedded Ray).")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: processes on this machine; ray: one Ray task per scene, on the cluster of "
                   "RAY_ADDRESS or an embedded one-machine Ray (needs rts-tf[ray]).")
@click.option("--overwrite", is_flag=True, default=False, help="Replace records built with other settings.")
@click.option("--allow-no-labels", is_flag=True, default=False,
              help="Build although no label polygon lies on any scene (records of negatives only); without it "
                   "such labels (far away, or in a wrong CRS) are refused.")
@sensor_options
def build_records_command(scenes, labels, dem, rel_elevation, slope, tcvis, bands, sites, default_region, label_field,
                          label_values, out, tile_size, overlap, max_ignored, rel_elevation_radius, dem_min_valid,
                          all_touched,
                          compression, compression_level, workers, engine, overwrite, allow_no_labels,
                          **sensor) -> None:
    """Align scenes, terrain, TCVIS and labels, tile them and write TFRecord shards.

    --bands chooses the band set the records hold (default: the paper's ten); the DEM and TCVIS are
    needed only for bands made from them.

    Scenes are PlanetScope (4- or 8-band), Sentinel-2 L2A (.SAFE or band files) or, with --sensor
    generic, any raster; each sensor's numbers become the same canonical reflectance. Every source
    is brought onto each scene's grid. Pixels that are unusable (UDM2, SCL, --mask), nodata, or
    outside the DEM/TCVIS get label 255 (ignore). Writes OUT/<region>/<scene_id>.tfrecord[.gz] and
    OUT/manifest.json (records schema 2: reflectance uint16 x 1e-4, TCVIS uint8, NDVI int16,
    terrain float16; see records/README.md). Re-running the same command resumes: complete, verified scenes are skipped.
    """
    from rts_tf.build import BuildSettings, build_records

    settings = BuildSettings(tile_size=tile_size, overlap=overlap, max_ignored=max_ignored,
                             compression=compression, compression_level=compression_level,
                             rel_elevation_radius=rel_elevation_radius,
                             all_touched=all_touched, dem_min_valid=dem_min_valid,
                             bands=tuple(bands) if bands else BUILD.bands)
    update, close = progress_bar("tiles")
    try:
        summary = build_records(scenes=list(scenes), labels=labels, out=out, tcvis=list(tcvis), dem=list(dem),
                                rel_elevation=list(rel_elevation), slope=list(slope), sites=sites,
                                settings=settings, workers=workers, engine=engine, overwrite=overwrite,
                                progress=update,
                                label_field=label_field, label_values=label_values,
                                default_region=default_region, sensor=SensorSettings(**sensor),
                                allow_no_labels=allow_no_labels)
    finally:
        close()
    for line in summary.lines():
        click.echo(line)


@main.command("inspect")
@click.argument("records", type=click.Path())
@click.option("--previews", type=click.Path(file_okay=False), default=None,
              help="Folder for PNG previews of sample tiles (default: RECORDS/previews).")
@click.option("--samples", type=int, default=12, show_default=True, help="How many tiles to preview.")
@click.option("--tensorboard", type=click.Path(file_okay=False), default=None,
              help="Also write the previews as TensorBoard image summaries to this log folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which tiles are sampled.")
def inspect_command(records: str, previews: str | None, samples: int, tensorboard: str | None, seed: int) -> None:
    """Verify shards against the manifest, summarise regions and scenes, and preview tiles."""
    from rts_tf.inspection import inspect_records

    report = inspect_records(records, previews=previews, samples=samples, tensorboard=tensorboard, seed=seed)
    click.echo(report.text())
    if report.problems:
        raise click.ClickException(f"{len(report.problems)} shard(s) failed verification: {report.problems[0]}")


def split_list(ctx, param, value):
    """Repeated or comma-separated values (or a YAML list) as one list; None when not given."""
    if not value:
        return None
    return [part.strip() for item in value for part in str(item).split(",") if part.strip()]


def band_set(ctx, param, value):
    """A --bands text (or YAML list) as canonical band names (rts_tf.bands.parse_bands); None when not given."""
    if value is None or value == () or value == "":
        return None
    from rts_tf.bands import parse_bands

    try:
        return parse_bands(value if isinstance(value, (str, list)) else list(value))
    except ValueError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None


def band_tokens(ctx, param, value):
    """A --bands text checked for unknown names but kept as given ('all' is resolved against the records)."""
    if band_set(ctx, param, value) is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def split_integers(ctx, param, value):
    values = split_list(ctx, param, value)
    try:
        return None if values is None else [int(v) for v in values]
    except ValueError:
        raise click.BadParameter(f"expected whole numbers, got {', '.join(values)}", ctx=ctx, param=param) from None


@main.command("fit")
@config_option
@click.option("--records", type=click.Path(), help="Records folder (with manifest.json).")
@click.option("--logdir", type=click.Path(file_okay=False), help="Run folder: checkpoints, TensorBoard logs, model.")
@click.option("--arch", type=TableChoice("rts_tf.models", "ARCHITECTURES"), default=FIT.arch,
              show_default=True, help="Decoder architecture.")
@click.option("--encoder", default=FIT.encoder, show_default=True,
              help="Any segmentation-models backbone: resnet18/34/50/101, efficientnetb0-b7, ...")
@click.option("--encoder-weights", default=None,
              help="'imagenet' (from the local Keras cache, never downloaded) or a 3-band .h5 weight file; "
                   "default: train from scratch.")
@click.option("--decoder-filters", multiple=True, callback=split_integers, help="Decoder widths, e.g. 128,64,32,16,8.")
@click.option("--deep-supervision", is_flag=True, default=None, help="UNet++: train each of the four heads with its own loss; predict with their mean.")
@click.option("--output-stride", type=click.Choice(["16", "8"]), default=None, callback=lambda c, p, v: v and int(v),
              help="DeepLabv3/v3+: downsampling of the encoder output, kept by dilating the last encoder stage(s) "
                   "instead of striding (a DeepLabv3-resnet34 step at 8 takes about 3x its CPU time at 16); UNet and "
                   "UNet++ ignore it. [default: 16]")
@click.option("--epochs", type=int, default=FIT.epochs, show_default=True)
@click.option("--batch-size", type=int, default=FIT.batch_size, show_default=True,
              help="Tiles per replica (per GPU); the global batch is this times the number of replicas.")
@click.option("--global-batch-size", type=int, default=None,
              help="Set the global batch instead; it must be divisible by the number of replicas.")
@click.option("--holdout-region", default=None,
              help="Test region: never trained on and never used to choose anything (checkpoint, early stopping, "
                   "threshold); only scored for TensorBoard's test curves and by `evaluate`.")
@click.option("--train-regions", multiple=True, callback=split_list, help="Comma-separated training regions.")
@click.option("--val-regions", multiple=True, callback=split_list,
              help="Comma-separated regions that validate (model selection) instead of a split of the training "
                   "regions.")
@click.option("--val-split", type=TableChoice("rts_tf.settings", "VAL_SPLITS"), default=FIT.val_split,
              show_default=True,
              help="Validation from the training regions: whole scenes, or an edge strip of tiles in each scene "
                   "with a one-tile buffer; auto takes scenes unless they would take over twice --val-fraction.")
@click.option("--val-fraction", type=float, default=FIT.val_fraction, show_default=True,
              help="Share of each training region's scenes (or of each scene's tile rows) that validates.")
@click.option("--validate-on-training-data", is_flag=True, default=None,
              help="Validate on the training data itself (no independent model selection).")
@click.option("--test-curves/--no-test-curves", default=None,
              help="Score the held-out region after every epoch for TensorBoard (never used for choices). "
                   "[default: on]")
@click.option("--loss", type=TableChoice("rts_tf.losses", "LOSSES"), default=FIT.loss,
              show_default=True, help="All losses ignore label 255.")
@click.option("--learning-rate", type=float, default=FIT.learning_rate,
              show_default=True, help="Initial AdamW learning rate.")
@click.option("--weight-decay", type=float, default=FIT.weight_decay, show_default=True, help="AdamW weight decay.")
@click.option("--schedule", type=TableChoice("rts_tf.settings", "SCHEDULES"), default=FIT.schedule,
              show_default=True, help="Learning-rate schedule over the run.")
@click.option("--schedule-step-epochs", type=int, default=FIT.schedule_step_epochs,
              show_default=True, help="Epochs per step (step).")
@click.option("--schedule-decay", type=float, default=FIT.schedule_decay, show_default=True,
              help="Factor per step (step) or over the run (exponential).")
@click.option("--early-stopping", type=int, default=FIT.early_stopping, show_default=True,
              help="Stop after this many epochs without a better validation IoU (0: never).")
@click.option("--seed", type=int, default=FIT.seed,
              show_default=True, help="Seed for weights, shuffling, augmentation.")
@click.option("--bands", default=None, callback=lambda *args: band_tokens(*args),
              help="Train on these of the records' bands (names and groups as in build-records --bands, e.g. "
                   "optical or optical+terrain; 'all': every band of the records). Default: all the records' bands. "
                   "Normalisation, pretrained RGB filters and image panels follow the set; run.json lists it.")
@click.option("--augment/--no-augment", default=FIT.augment, show_default=True,
              help="Flips, rotations, blur, brightness/contrast, noise (training only).")
@click.option("--augment-on", type=click.Choice(["device", "host"]), default=FIT.augment_on, show_default=True,
              help="Where augmentation runs: in the training step on the training device (GPU: the CPU only "
                   "reads records), or in the tf.data pipeline on the CPU. Same transforms and seeds; the "
                   "tiles agree to float tolerance.")
@click.option("--oversample-slumps", type=int, default=FIT.oversample_slumps, show_default=True,
              help="Show tiles with slumps this many times per epoch.")
@click.option("--cache", is_flag=True, default=None, help="Cache decoded tiles in memory after the first epoch.")
@click.option("--shuffle-buffer", type=int, default=FIT.shuffle_buffer,
              show_default=True, help="Tiles in the shuffle buffer.")
@click.option("--mixed-precision", is_flag=True, default=None, help="mixed_float16 compute (GPUs); float32 output.")
@click.option("--xla", is_flag=True, default=None, help="Compile the training step with XLA (GPUs).")
@click.option("--devices", multiple=True, callback=split_list,
              help="Comma-separated devices for MirroredStrategy (default: all GPUs).")
@click.option("--logical-cpus", type=int, default=FIT.logical_cpus, show_default=True,
              help="Split the CPU into this many devices and mirror over them (CPU-only machines, tests).")
@click.option("--image-every", type=int, default=FIT.image_every, show_default=True,
              help="Write validation image panels to TensorBoard every N epochs (0: never).")
@click.option("--image-tiles", type=int, default=FIT.image_tiles,
              show_default=True, help="Validation tiles in the panels.")
@click.option("--profile", is_flag=True, default=None, help="Profile batches 2-4 for TensorBoard's profiler.")
@click.option("--steps-per-epoch", type=int, default=None, help="Fixed steps per epoch (default: one pass).")
@click.option("--bn-momentum", type=float, default=None,
              help="Momentum of every BatchNormalization layer's moving statistics [default: the encoder's, 0.99]. "
                   "Short runs (a few hundred steps) need less, e.g. 0.9: inference uses these statistics, and at "
                   "0.99 they trail the weights by about a hundred steps.")
@click.option("--deterministic/--no-deterministic", default=FIT.deterministic, show_default=True,
              help="Deterministic TensorFlow ops: the same seed on the same machine gives the same weights and "
                   "scores, bit for bit. --no-deterministic allows faster, unordered GPU kernels. Off under --xla "
                   "(TensorFlow has no deterministic XLA gradient of max pooling).")
@click.option("--verify", is_flag=True, default=False, help="Check every shard's sha256 (default: its size).")
@click.option("--overwrite", is_flag=True, default=False, help="Delete an existing run in --logdir first.")
def fit_command(overwrite: bool, verify: bool, **options) -> None:
    """Train a segmentation model on records.

    With --holdout-region the held-out region is a test set: the best checkpoint, early stopping
    and the threshold are chosen on validation data drawn from the training regions (--val-split),
    and the held-out region is only scored for TensorBoard's test curves and by `evaluate`.

    Before training, fit checks that the validation data holds slump pixels (and says how many):
    `auto` draws again, stratified by slump content, when the first draw holds none; a split you
    chose without slumps is refused. A flat validation threshold sweep keeps 0.5, with a warning.

    Multi-GPU: MirroredStrategy over all visible GPUs (or --devices). Multi-machine:
    MultiWorkerMirroredStrategy when TF_CONFIG is set. Re-running the same command resumes an
    interrupted run from its last finished epoch (also after a kill at any point); runtime options
    (--devices, --logical-cpus, --image-every, --image-tiles, --profile, --cache, --deterministic,
    --augment-on) may change between attempts, anything else (or the records' content) makes it another run. Ends with LOGDIR/model.keras, saved_model/ and
    run.json (band order, normalisation, tile size, metrics) for `rts-tf predict`.
    """
    from rts_tf.train import FitConfig, fit

    config = FitConfig(**{key: value for key, value in options.items() if value is not None})
    result = fit(config, overwrite=overwrite, verify=verify)
    for line in result.lines():
        click.echo(line)


@main.command("evaluate")
@click.option("--run", "run", multiple=True, required=True, type=click.Path(),
              help="Run folder written by `rts-tf fit`; repeat it for an ensemble (the runs' mean probability).")
@click.option("--records", required=True, type=click.Path(), help="Records folder.")
@click.option("--region", default=None, help="Region to score ('all' for every region; default: the run's "
                                             "held-out region).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Probability threshold (default: the run's, chosen on its validation data).")
@click.option("--verify", is_flag=True, default=False, help="Check every shard's sha256 (default: its size).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for metrics.json and metrics.md (default: the (first) run folder).")
@click.option("--min-area", type=click.FloatRange(0), default=100.0, show_default=True,
              help="Predicted objects smaller than this (m2) are not counted, as `predict` drops their polygons.")
@click.option("--trust-model", is_flag=True, default=False,
              help="Also load HDF5/SavedModel files and Lambda layers, which run code stored in the model file.")
def evaluate_command(run: tuple[str, ...], records: str, region: str | None, threshold: float | None, out: str | None,
                     min_area: float, verify: bool, trust_model: bool) -> None:
    """Score a run (or an ensemble) on scene mosaics (overlapping tiles counted once), per region and overall.

    Pixel IoU, F1, precision, recall at the threshold; object-level precision/recall/F1 (a
    predicted slump matches a true one at IoU >= 0.5); boundary IoU. Ignored pixels are excluded
    everywhere. Each row says what the region is to the run: held-out or unseen (transfer scores),
    or training/validation data (not transfer scores). For the held-out region also the paper-style
    max IoU (best epoch on that region at threshold 0.5, Nitze et al. 2021) and the oracle IoU
    (best epoch and threshold on that region): transfer <= oracle and paper-style <= oracle.
    """
    from rts_tf.evaluate import evaluate, markdown_table

    result = evaluate(list(run) if len(run) > 1 else run[0], records, region=region, out=out, threshold=threshold, min_area=min_area, verify=verify,
                      trust_model=trust_model)
    click.echo(markdown_table(result))


@main.command("crossval")
@click.option("--records", required=True, type=click.Path(), help="Records folder.")
@click.option("--arch", "arch", multiple=True, help="Architecture(s) (repeatable); or from --grid.")
@click.option("--encoder", "encoder", multiple=True, help="Encoder(s) (repeatable); or from --grid.")
@click.option("--logdir", required=True, type=click.Path(file_okay=False), help="Parent folder of all runs.")
@click.option("--grid", type=click.Path(dir_okay=False), default=None,
              help="YAML grid such as experiments/paper2021.yaml: arch and encoder lists plus fit options.")
@click.option("--regions", multiple=True, callback=split_list,
              help="Comma-separated regions to hold out (default: every region).")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="Tiles per replica.")
@click.option("--decoder-filters", multiple=True, callback=split_integers, help="Decoder widths.")
@click.option("--learning-rate", type=float, default=None)
@click.option("--loss", type=TableChoice("rts_tf.losses", "LOSSES"), default=None)
@click.option("--image-every", type=int, default=None)
@click.option("--seed", type=int, default=None, help="Seed of every run (one run per cell); see --seeds.")
@click.option("--seeds", type=int, default=None,
              help="Train each cell N times with seeds 0..N-1 (runs in <region>/seed<N>): the table gives mean ± sd "
                   "over seeds and a seed-ensemble row. A grid file may list seeds instead (seed: [0, 1, 2]).")
@click.option("--val-split", type=TableChoice("rts_tf.settings", "VAL_SPLITS"), default=None,
              help="Validation drawn from the training regions of each run (see `fit --help`).")
@click.option("--band-set", "band_sets", multiple=True,
              help="A band ablation: NAME=BANDS (repeatable), e.g. optical=blue,green,red,nir,ndvi, "
                   "optical+terrain=optical,terrain, all (BANDS as in build-records --bands; a group name alone "
                   "names itself). Each band set is a column beside the model; its runs in "
                   "LOGDIR/<arch>_<encoder>/<NAME>/<region>.")
@click.option("--val-fraction", type=float, default=None, help="Share of the training data that validates.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: one run after the other in this process; ray: one Ray task per run (one GPU each when "
                   "the cluster has GPUs), on the cluster of RAY_ADDRESS or an embedded one-machine Ray.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="--engine ray: CPUs of each run when there is no GPU, and of an embedded Ray.")
def crossval_command(records, arch, encoder, logdir, grid, regions, engine, workers, seeds, band_sets,
                     **overrides) -> None:
    """Leave-one-region-out cross-validation over architectures, encoders, band sets and seeds.

    Trains one run per architecture, encoder, held-out region (and seed) in
    LOGDIR/<arch>_<encoder>/<region>[/seed<N>], scores it on its held-out region and writes
    LOGDIR/crossval.csv (a row per run with its seed, a mean row and a seed-ensemble row per cell)
    and crossval.md (rows: held-out regions; columns: models; mean ± sd over seeds of transfer IoU,
    paper-style max IoU and transfer F1). One run is noise: use --seeds 3 or more to compare models.
    Re-running skips finished runs and resumes an interrupted one; scores are recomputed unless
    crossval computed them for exactly that run, records and code. `tensorboard --logdir LOGDIR`
    shows all runs in one HParams table.

    With --band-set (a band ablation) every model is trained on each band set: columns
    `<arch> <encoder> [NAME]`, so the table shows what each source (TCVIS, terrain) is worth.
    """
    from rts_tf.crossval import crossval

    result = crossval(records, logdir, arch=list(arch) or None, encoder=list(encoder) or None, grid=grid,
                      regions=regions, overrides=overrides, report=click.echo, engine=engine, workers=workers,
                      seeds=seeds, band_sets=list(band_sets) or None)
    click.echo(result.markdown())
    click.echo(f"{result.trained} runs trained, {result.skipped} already complete; tables in {logdir}/crossval.md "
               "and crossval.csv")


@main.command("predict")
@click.option("--run", "runs", multiple=True, required=True, type=click.Path(),
              help="Run folder; repeat for an ensemble (the mean probability of the runs).")
@click.option("--scene", "scenes", multiple=True, required=True, type=click.Path(),
              help="A scene folder or a folder of scene folders (repeatable).")
@click.option("--dem", multiple=True, type=click.Path(), help="DEM file, VRT or folder of tiles (repeatable).")
@click.option("--rel-elevation", multiple=True, type=click.Path(), help="Precomputed relative elevation.")
@click.option("--slope", multiple=True, type=click.Path(), help="Precomputed slope.")
@click.option("--tcvis", multiple=True, type=click.Path(),
              help="TCVIS file, VRT or folder of tiles; needed only when the run's bands have TCVIS bands.")
@click.option("--sites", type=click.Path(), default=None, help="Site polygons, to fill the polygons' region field.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--overlap", type=int, default=None, help="Window overlap in pixels (default: the run's records').")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--tta", is_flag=True, default=False, help="Test-time augmentation: average over flips.")
@click.option("--threshold", type=float, default=None,
              help="Probability threshold for the mask (default: the run's, chosen on its validation data).")
@click.option("--rel-elevation-radius", type=float, default=None,
              help="Only with --allow-feature-mismatch: another radius than the run's records were built with.")
@click.option("--allow-feature-mismatch", is_flag=True, default=False,
              help="Predict although the inputs make other bands than the model was trained on.")
@click.option("--min-area", type=float, default=100.0, show_default=True, help="Smallest polygon kept, m2.")
@click.option("--drop-touching", is_flag=True, default=False,
              help="Drop polygons touching nodata or the scene edge (possibly cut slumps).")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: this process; ray: Ray actors that each load the model once (one per GPU, or per "
                   "--workers CPUs), on the cluster of RAY_ADDRESS or an embedded one-machine Ray.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="--engine ray: CPUs of each predicting actor when there is no GPU, and of an embedded Ray.")
@click.option("--readers", type=click.IntRange(0), default=None,
              help="Processes that stack the windows (read, warp TCVIS and DEM, terrain, NDVI) ahead of the model, "
                   "per predicting process (default: half the cores, 1 to 4; none for less than 2048 x 2048 px of "
                   "scenes in all); 0: one thread of the predicting process. Same results for any N.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Recompute scenes that already have results (else complete ones are skipped, and results of "
                   "other settings refused).")
@click.option("--trust-model", is_flag=True, default=False,
              help="Also load HDF5/SavedModel files and Lambda layers, which run code stored in the model file.")
@click.option("--merge-period", type=click.Choice(["year", "all", "none"]), default="year", show_default=True,
              help="Merge overlapping detections of all scenes and sensors into one polygon per calendar year, "
                   "over all dates, or not at all (layer `merged` of OUT/rts_polygons.gpkg).")
@sensor_options
def predict_command(runs, scenes, dem, rel_elevation, slope, tcvis, sites, out, overlap, batch_size, tta, threshold,
                    rel_elevation_radius, allow_feature_mismatch, min_area, drop_touching, engine, workers, overwrite,
                    trust_model, merge_period, readers, **sensor) -> None:
    """Map slumps over whole scenes: probability and mask Cloud-Optimised GeoTIFFs and polygons.

    Uses the same scene stack as build-records, so bands, order and normalisation match training
    (a scene of another sensor than the model's records is predicted, with a warning). Only the
    sources the run's bands are made from are needed: no --tcvis for a model without TCVIS bands,
    no --dem for one without terrain bands.
    Writes per scene OUT/<scene_id>/<scene_id>_probability.tif and _mask.tif (with QGIS .qml styles),
    _polygons.gpkg (layers rts: polygons with probability statistics, area and perimeter; extent: where
    the model looked), _quicklook.png and <scene_id>.json (STAC item); for the run OUT/rts_polygons.gpkg
    (EPSG:4326, layers detections, merged and extents, styled for QGIS), rts_detections.parquet and
    rts_merged.parquet (GeoParquet), rts_probability.vrt (one mosaic per CRS) and collection.json (STAC).
    Re-running the command skips scenes that are complete (OUT/<scene_id>/<scene_id>_complete.json).
    """
    from rts_tf.predict import predict

    update, close = progress_bar("tiles")
    try:
        summary = predict(list(runs), list(scenes), out, list(tcvis), dem=list(dem), rel_elevation=list(rel_elevation),
                          slope=list(slope), sites=sites, overlap=overlap, batch_size=batch_size, flips=tta,
                          threshold=threshold, min_area=min_area, drop_touching=drop_touching, overwrite=overwrite,
                          engine=engine, workers=workers,
                          rel_elevation_radius=rel_elevation_radius, allow_feature_mismatch=allow_feature_mismatch,
                          trust_model=trust_model, progress=update, sensor=SensorSettings(**sensor),
                          merge_period=merge_period, readers=readers)
    finally:
        close()
    for line in summary.lines():
        click.echo(line)
    if summary.failed:
        raise InputError(summary.failure_message())


# --- fetch: ArcticDEM and Sentinel-2 from open STAC catalogues -----------------------------------------

from rts_tf.fetch import DEM_BUFFER, EARTH_SEARCH, PGC_STAC, SENTINEL2_COLLECTION  # noqa: E402  (no heavy imports)

def _fetch_module(name: str):
    """rts_tf.fetch.<name>, or a one-line error naming the extra when its packages are missing."""
    try:
        import pystac_client  # noqa: F401
    except ImportError:
        from rts_tf.fetch import FETCH_EXTRA_HINT

        raise InputError(FETCH_EXTRA_HINT) from None
    return importlib.import_module(f"rts_tf.fetch.{name}")


@main.group("fetch", cls=Commands)
def fetch_group() -> None:
    """Download inputs by area from open STAC catalogues (no account needed): ArcticDEM and Sentinel-2 L2A.

    Reads only the windows of the Cloud-Optimised GeoTIFFs that cover the area. Re-running skips
    what is complete; --dry-run lists what would be read and its size.
    """


@fetch_group.command("dem")
@click.option("--aoi", type=click.Path(), default=None, help="Area of interest: a vector file (any CRS).")
@click.option("--scenes", multiple=True, type=click.Path(),
              help="Instead of --aoi: the footprints of the scenes in these folders (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: tiles/*.tif, datamask/*.tif, dem.vrt, fetch.json.")
@click.option("--resolution", type=click.Choice(["2", "10", "32"]), default="2", show_default=True,
              help="ArcticDEM mosaic resolution, metres.")
@click.option("--buffer", type=float, default=DEM_BUFFER, show_default=True,
              help="Metres added around the area (at least the 100 m relative-elevation radius).")
@click.option("--stac", "stac_url", default=PGC_STAC, show_default=True,
              help="STAC API URL (the Polar Geospatial Center's).")
@click.option("--collection", default=None,
              help="Collection (default: arcticdem-mosaics-v4.1-<resolution>m).")
@click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True, help="Parallel downloads.")
@click.option("--dry-run", is_flag=True, default=False, help="List the tiles and windows and their size; read nothing.")
def fetch_dem_command(aoi, scenes, out, resolution, buffer, stac_url, collection, workers, dry_run) -> None:
    """ArcticDEM mosaic (EPSG:3413) over an area, for build-records --dem OUT/dem.vrt.

    Writes the window of each mosaic tile covering the area plus --buffer as OUT/tiles/<tile>_dem.tif
    (pixels whose datamask is 0 set to nodata -9999), OUT/dem.vrt over them, and OUT/fetch.json
    (catalogue, collection, release, tile ids and source URLs).
    """
    module = _fetch_module("dem")
    update, close = progress_bar("ArcticDEM tiles")
    try:
        result = module.fetch_dem(out, aoi=aoi, scenes=list(scenes), resolution=int(resolution), buffer=buffer,
                                  stac_url=stac_url, collection=collection, workers=workers, dry_run=dry_run,
                                  progress=update)
    finally:
        close()
    for line in result.lines():
        click.echo(line)


@fetch_group.command("sentinel2")
@click.option("--aoi", required=True, type=click.Path(), help="Area of interest: a vector file (any CRS).")
@click.option("--dates", required=True, help="START/END, e.g. 2022-07-01/2022-08-31.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: one folder per scene (B02, B03, B04, B08, SCL .tif and item.json), fetch.json.")
@click.option("--max-cloud", type=float, default=20.0, show_default=True,
              help="Most cloud over the area, percent of its pixels (by the scene's SCL).")
@click.option("--max-tile-cloud", type=float, default=90.0, show_default=True,
              help="Skip scenes whose catalogue cloud cover (eo:cloud_cover, whole tile) is higher, unread.")
@click.option("--per-period", type=click.IntRange(1), default=1, show_default=True,
              help="Scenes kept per MGRS tile and period (the least cloudy over the area).")
@click.option("--period", type=click.Choice(["all", "year", "month"]), default="all", show_default=True,
              help="all: the whole --dates range; year or month: --per-period scenes for each.")
@click.option("--stac", "stac_url", default=EARTH_SEARCH, show_default=True,
              help="STAC API URL (Element 84's Earth Search).")
@click.option("--collection", default=SENTINEL2_COLLECTION, show_default=True,
              help="Sentinel-2 L2A collection (collection 1: reprocessed, consistent offsets).")
@click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True, help="Parallel downloads.")
@click.option("--dry-run", is_flag=True, default=False,
              help="List the candidate scenes, the windows and their size; read no pixels.")
def fetch_sentinel2_command(aoi, dates, out, max_cloud, max_tile_cloud, per_period, period, stac_url, collection,
                            workers, dry_run) -> None:
    """Sentinel-2 L2A scenes over an area, least cloudy first, for build-records --scenes OUT.

    Reflectance is right whatever the catalogue declares: the processing baseline (04.00 on: DN
    offset -1000), the item's raster:bands offset and the pixels themselves are compared (README,
    "Fetching inputs"); each scene's item.json carries the scale and offset build-records applies.
    """
    module = _fetch_module("sentinel2")
    update, close = progress_bar("scenes", unit="scene")
    try:
        result = module.fetch_sentinel2(out, aoi, dates, stac_url=stac_url, collection=collection,
                                        max_cloud=max_cloud, max_tile_cloud=max_tile_cloud, per_period=per_period,
                                        period=period, workers=workers, dry_run=dry_run, progress=update)
    finally:
        close()
    for line in result.lines():
        click.echo(line)


@main.command("track")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--date-field", default=None, metavar="NAME",
              help="Field holding each polygon's date (YYYY-MM-DD or YYYYMMDD) [default: image_date, else date]; "
                   "without one, a date in the file name, else in the scene_id.")
@click.option("--site-field", default=None, metavar="NAME",
              help="Field naming each polygon's site [default: site, else region, else one site for all].")
@click.option("--layer", default=None, help="Layer of multi-layer files [default: detections, rts, or the only one].")
@click.option("--tolerance", type=float, default=None,
              help="Metres within which objects of two dates link, for co-registration error between sensors "
                   "[default: two pixels of the coarsest input; 6 m when unknown].")
@click.option("--max-gap-years", type=float, default=2.5, show_default=True,
              help="A slump missed on some dates (clouds, no image) keeps its track when seen again within this "
                   "time; after a longer gap it is a new slump on a stabilised scar.")
@click.option("--pixel-size", type=float, default=None,
              help="Pixel size of the change maps in metres [default: the coarsest input's; 3 m when unknown].")
@click.option("--no-change-maps", "change_maps", is_flag=True, default=True, flag_value=False,
              help="Do not write the change maps.")
@click.option("--no-plots", "plots", is_flag=True, default=True, flag_value=False, help="Do not write the PNG plots.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace the results of an earlier run in --out.")
def track_command(inputs, out, date_field, site_field, layer, tolerance, max_gap_years, pixel_size, change_maps, plots,
                  overwrite) -> None:
    """Link slump polygons of several dates into slump histories: lineage, growth rates, change maps.

    INPUT: polygon files (GeoPackage, Shapefile, GeoJSON, GeoParquet; any CRS) or `predict` output
    folders, of several dates and sites, in any order. Objects of consecutive dates that overlap
    (within --tolerance) are one slump; merges, splits, new slumps and stabilised ones are named
    as in the ARTS inventory (MergedRTS, SplitRTS, StabilizedRTS). Areas in EPSG:6931 (EASE-Grid
    2.0 North, equal-area). Writes OUT/tracks.gpkg (layers observations, tracks, relations) and
    the same as GeoParquet, OUT/summary.csv, OUT/change.tif (first date each pixel was in a slump,
    YYYYMMDD; one per site when there are several) and PNG plots.
    """
    from rts_tf.track import track

    update, close = progress_bar("track", unit="step")
    try:
        summary = track(list(inputs), out, date_field=date_field, site_field=site_field, layer=layer,
                        tolerance=tolerance, max_gap_years=max_gap_years, pixel_size=pixel_size,
                        change_maps=change_maps, plots=plots, overwrite=overwrite, progress=update)
    finally:
        close()
    for warning in summary.warnings:
        click.echo(f"Warning: {warning}", err=True)
    for line in summary.lines():
        click.echo(line)


@main.command("export")
@click.option("--run", required=True, type=click.Path(), help="Run folder of `rts-tf fit` (run.json, model.keras).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "savedmodel"]), required=True,
              help="onnx: model.onnx for onnxruntime and other ONNX runtimes (needs the `export` extra); "
                   "savedmodel: a TensorFlow SavedModel (TF Serving, TFLite converter).")
@click.option("--out", required=True, type=click.Path(), help="Package folder to create (must not exist).")
@click.option("--trust-model", is_flag=True, default=False,
              help="Also load HDF5/SavedModel files and Lambda layers, which run code stored in the model file.")
def export_command(run, fmt, out, trust_model) -> None:
    """Export a trained run as a portable package: the inference model with its normalisation inside
    (ONNX or SavedModel), model.keras, run.json and model.json, a model card (bands in order with units,
    normalisation, pixel and tile size, sensors, training regions and scenes, scores, threshold, sha256).
    `rts-tf predict --run OUT` accepts the package (an ONNX one runs under onnxruntime)."""
    from rts_tf.export import export

    for line in export(run, fmt, out, trust_model=trust_model).lines():
        click.echo(line)
