"""Check a dataset for files the decoders would choke on: `python launch/scan.py DATA_ROOT [--out DIR]`.

Reports every bad file with its reason (and what in the class folders training does not read)
and writes file lists for `data.train_files=DIR/train.txt data.val_files=DIR/val.txt` (see
pipelines/scan.py).
"""

from __future__ import annotations

import sys

from alexnet.interrupt import status_of
from pipelines.scan import main

if __name__ == "__main__":
    sys.exit(status_of(main))
