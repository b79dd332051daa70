"""``NSTLAB_OFFLINE``: one switch that keeps nstlab off the network.

nstlab downloads two kinds of files on first use: torchvision's ImageNet weights for the extractors and
the AdaIN release weights for the report's pseudo ground truth. On a machine without internet (a cluster
node, a sandbox) each attempt costs a timeout before it fails; with ``NSTLAB_OFFLINE=1`` no attempt is
made: what is cached is used, a missing file is the usual one-line error at once, and ``maker="auto"``
takes the Magenta reference without trying to fetch AdaIN. The test suite sets it so that it never
downloads, whatever the machine.
"""

from __future__ import annotations

import os

ENV_VAR = "NSTLAB_OFFLINE"


def offline() -> bool:
    """True when ``$NSTLAB_OFFLINE`` is set to anything but an empty string, 0, false or no."""
    return os.environ.get(ENV_VAR, "").strip().lower() not in ("", "0", "false", "no")


__all__ = ["ENV_VAR", "offline"]
