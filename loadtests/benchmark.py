"""``python -m loadtests.benchmark [--quick ...]``: the benchmark's documented command.

The benchmark itself lives in ``loadtests.bench`` (its command line in ``loadtests.bench.cli``).
"""

from __future__ import annotations

import sys

from loadtests.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
