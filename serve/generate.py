"""Thin launcher for gqla-serve (see gqla_megatron/inference/cli.py):

    python serve/generate.py generate --load runs/tiny --prompt-ids "1 2 3" --decode-path auto
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gqla_megatron.inference.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
