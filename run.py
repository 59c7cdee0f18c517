"""Train and evaluate Multimodal CoCoNuT from a YAML config.

    python run.py args/demo.yaml [key=value ...]
    torchrun --nnodes 1 --nproc_per_node N run.py args/multimodal_coconut.yaml
"""

import sys

from multimodal_coconut.cli import main

if __name__ == "__main__":
    sys.exit(main())
