"""``python -m onnxgate``."""

import sys

from onnxgate.cli import main

sys.exit(main())
