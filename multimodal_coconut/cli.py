"""`python run.py CONFIG.yaml [key=value ...]`: the config is checked before torch is even imported."""

from __future__ import annotations

import sys

from .config import ConfigError, load_config

USAGE = """usage: python run.py CONFIG.yaml [key=value ...]
       torchrun --nnodes 1 --nproc_per_node N run.py CONFIG.yaml [key=value ...]"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .train import run

    try:
        run(cfg)
    except ConfigError as e:  # found once the run's files are read, e.g. resuming with a changed config
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
