"""Thin launcher for gqla_megatron.training (see its CLI docstring for torchrun lines):

    torchrun --standalone --nproc-per-node 4 pretrain/pretrain_gqla.py --recipe tiny_cpu \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --mock-data
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gqla_megatron.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
