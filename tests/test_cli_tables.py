"""The command line takes its choices and defaults from the library's own tables and settings."""

from dataclasses import fields

import click

from rts_tf.cli import TableChoice, main
from rts_tf.losses import LOSSES
from rts_tf.models import ARCHITECTURES
from rts_tf.records import COMPRESSIONS
from rts_tf.settings import SCHEDULES, VAL_SPLITS, BuildSettings, FitConfig


def options(command: str) -> dict[str, click.Option]:
    return {param.name: param for param in main.commands[command].params if isinstance(param, click.Option)}


def test_choices_are_the_library_tables():
    fit, build = options("fit"), options("build-records")
    expected = [(fit, "arch", ARCHITECTURES), (fit, "loss", LOSSES), (fit, "schedule", SCHEDULES),
                (fit, "val_split", VAL_SPLITS), (build, "compression", COMPRESSIONS),
                (options("crossval"), "loss", LOSSES)]
    for command, name, table in expected:
        assert isinstance(command[name].type, TableChoice), name
        assert command[name].type.choices == tuple(table), name
    assert fit["arch"].type.choices == ("unet", "unetpp", "deeplabv3", "deeplabv3plus")


def test_defaults_are_the_settings_defaults():
    for command, settings in (("fit", FitConfig()), ("build-records", BuildSettings())):
        params = options(command)
        # Options without a default of their own (None, or click's unset marker) fall back to the
        # settings' default when the settings are made.
        shared = [f.name for f in fields(settings) if f.name in params
                  and isinstance(params[f.name].default, (bool, int, float, str))]
        assert len(shared) >= 8, shared
        for name in shared:
            assert params[name].default == getattr(settings, name), (command, name)
