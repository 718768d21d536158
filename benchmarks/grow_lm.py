"""Does growing pay on a language model? A byte-level GPT trained from scratch against the same model grown.

    python benchmarks/grow_lm.py [--quick] [--seeds 0 1 2] [--policies ...] --out DIR

The benchmark's command line. Its code (data, model, policies, FLOP count, summary and plot) is
:mod:`fastsplit.lm_demo`, which ``fastsplit demo --task lm`` runs too (quick by default there);
see that module for the runs and the format of ``DIR/summary.json``.
"""

from __future__ import annotations

import sys

from fastsplit.lm_demo import main

if __name__ == "__main__":
    sys.exit(0 if main() else 1)
