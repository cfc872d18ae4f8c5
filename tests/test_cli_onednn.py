"""The command line turns on TensorFlow's oneDNN CPU kernels before TensorFlow is imported, unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# A fresh process per case: TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it is imported.
SCRIPT = textwrap.dedent(
    """
    import os, sys
    from rts_tf.cli import main
    imported_early = "tensorflow" in sys.modules
    try:
        main(["fit", "--help"], standalone_mode=False)  # the group callback runs, then fit's help (imports TF)
    except SystemExit:
        pass
    import tensorflow as tf
    from rts_tf.models.blocks import onednn_enabled
    print("RESULT", imported_early, os.environ.get("TF_ENABLE_ONEDNN_OPTS"), onednn_enabled())
    """
)


def run_cli(**environment: str) -> list[str]:
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    env.update(environment, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return next(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("RESULT"))


def test_the_cli_turns_onednn_on_before_tensorflow_is_imported():
    imported_early, value, enabled = run_cli()

    assert imported_early == "False"  # the module imports TensorFlow lazily, so the variable still counts
    assert value == "1"
    assert enabled == "True"


def test_the_cli_keeps_the_users_onednn_choice():
    imported_early, value, enabled = run_cli(TF_ENABLE_ONEDNN_OPTS="0")

    assert imported_early == "False"
    assert value == "0"
    assert enabled == "False"
