"""``python -m training.cli <command>`` (torchrun relaunches a stage this way)."""

from training.cli import main

main()
