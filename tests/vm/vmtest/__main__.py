"""python3 -m vmtest prepare: build or find the cached Debian root file system. tests/vm/run
calls it in the background while cargo builds; it leaves a note (prepare.json) so that the run
that follows knows whether the cache was cold. The scenarios are pytest tests (tests/vm/run)."""

import json
import os
import sys
import time

from .config import PREPARED, REPO, log
from .image import ensure_base


def prepare():
    base, seconds = ensure_base()
    with open(PREPARED, "w") as f:
        json.dump({"at": time.time(), "base": base, "build_seconds": seconds}, f)
    if seconds is None:
        log(f"root file system cached: {os.path.relpath(base, REPO)}")


def main(argv):
    if argv != ["prepare"]:
        raise SystemExit("usage: python3 -m vmtest prepare   (the scenarios: tests/vm/run [a b c d e f g h])")
    if os.geteuid() != 0:
        raise SystemExit("the VM system test needs root (debootstrap, file ownership in the image)")
    prepare()


if __name__ == "__main__":
    main(sys.argv[1:])
