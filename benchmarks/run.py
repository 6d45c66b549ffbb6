"""`python benchmarks/run.py [--quick] [--only NAME…] [--out benchmarks/]`: the same as `python -m kd_fracture.bench`."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from kd_fracture.bench import main  # (sets OMP_WAIT_POLICY before torch is imported)

if __name__ == "__main__":
    raise SystemExit(main())
