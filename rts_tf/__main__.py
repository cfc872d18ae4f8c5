"""`python -m rts_tf` runs the command line."""

from rts_tf.cli import main

main()
