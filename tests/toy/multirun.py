"""tests/multirun.py with the toy reference mode and layout registered in every rank first (tests/toy/modes.py)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.multirun import main  # noqa: E402
from tests.toy.modes import register  # noqa: E402

if __name__ == "__main__":
    register()
    os._exit(main())
