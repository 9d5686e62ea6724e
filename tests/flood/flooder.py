"""The flood test's hostile device: `dgdm.sync.flood` run as a process by path
(`python flooder.py HOST PORT DEVICE_ID DEVICE_KEY COORD_PUB SECONDS OUT`)."""

from __future__ import annotations

import sys

from dgdm.sync.flood import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
