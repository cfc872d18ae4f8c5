"""Run `rts-tf fit` and kill the process (os._exit, no clean-up, as SIGKILL would) right after one of
fit's writes: `python kill_fit.py POINT EPOCH FIT-ARGUMENTS...`.

Points of an epoch's end (EPOCH is 1-based): history (history.json written), best (the epoch's best
checkpoint written), test (test_history.json written), backup (BackupAndRestore's backup written).
Points of the final save (EPOCH ignored): trained (training marked done), model (model.keras in
place), saved_model (the SavedModel in place, before run.json).
"""

import os
import sys

import tensorflow as tf

import rts_tf.monitor as monitor
import rts_tf.train as train
from rts_tf.cli import main

KILLED = 137


def kill() -> None:
    sys.stdout.flush()
    os._exit(KILLED)


def after(cls, method: str, when) -> None:
    """Wrap cls.method: call it, then kill the process when `when(self, args)` holds."""
    original = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if when(self, args):
            kill()
        return result

    setattr(cls, method, wrapped)


def install(point: str, epoch: int) -> None:
    at_epoch = lambda self, args: args[0] + 1 == epoch  # noqa: E731  (on_epoch_end(epoch, logs))
    if point == "history":
        after(monitor.EpochLog, "record", lambda self, args: self.path.name == "history.json" and args[0] + 1 == epoch)
    elif point == "test":
        after(monitor.EpochLog, "record", lambda self, args: self.path.name == "test_history.json"
              and args[0] + 1 == epoch)
    elif point == "best":
        after(monitor.BestCheckpoint, "on_epoch_end", at_epoch)
    elif point == "backup":
        after(tf.keras.callbacks.BackupAndRestore, "on_epoch_end", at_epoch)
    elif point == "trained":
        after(monitor.TrainingDone, "on_train_end", lambda self, args: True)
    elif point == "model":
        original = train.save_run

        def save_run(model, *args, **kwargs):
            model.export = lambda *a, **k: kill()  # model.keras is in place when the SavedModel starts
            return original(model, *args, **kwargs)

        train.save_run = save_run
    elif point == "saved_model":
        original_write = train.write_json
        train.write_json = lambda path, *a, **k: kill() if path.name == train.RUN_NAME else original_write(path, *a, **k)
    else:
        raise SystemExit(f"unknown kill point {point}")


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    main(sys.argv[3:], standalone_mode=True)
