"""The code location: ``Definitions`` for the home, profile, shards folder and deployment named by the
environment (``GDA_HOME``, ``GDA_PROFILE``, ``GDA_SHARDS``, ``GDA_DEPLOYMENT``: ``local`` by default, or
``k8s``; see ``gda_assets/deployment.py``)."""

import os
from pathlib import Path

from gda.home import Home
from gda_assets.factory import build_defs

_shards = os.environ.get("GDA_SHARDS")

defs = build_defs(
    home=Home.resolve(),
    shards=Path(_shards).resolve() if _shards else None,
    deployment=os.environ.get("GDA_DEPLOYMENT") or "local",
)
