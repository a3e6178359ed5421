"""Thin launcher for gqla-preprocess (raw text / jsonl -> Megatron .bin/.idx)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gqla_megatron.training.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
