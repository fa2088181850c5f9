"""Loaded at interpreter start when this folder is on PYTHONPATH (tests/test_packaging.py):
importing a module that belongs to an installed distribution outside RTSERVER_ALLOWED_DISTS
fails, as it would on a machine where only the server's declared dependencies are installed
(the test environment also holds the dev group's and the cluster extra's packages)."""

import importlib.abc
import importlib.metadata
import json
import os
import re
import sys


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_ALLOWED = {_norm(d) for d in json.loads(os.environ["RTSERVER_ALLOWED_DISTS"])}
_OWNERS = {
    module: {_norm(d) for d in dists}
    for module, dists in importlib.metadata.packages_distributions().items()
}


class _Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        owners = _OWNERS.get(name.partition(".")[0])
        if owners and not owners & _ALLOWED:
            raise ModuleNotFoundError(
                f"No module named {name!r} here: it comes from {sorted(owners)}, which the "
                "server does not depend on", name=name,
            )  # fmt: skip
        return None


sys.meta_path.insert(0, _Guard())
