"""Cloud platforms behind one seam; nothing outside this package knows which cloud it is on.

Modules are imported only when their platform is used, so `status` on a static node and
`--help` never load cloud libraries.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from cocoon_net.errors import UsageError
from cocoon_net.platform.base import Platform

_MODULES = {
    "static": "cocoon_net.platform.static",
    "gke": "cocoon_net.platform.gke",
    "volcengine": "cocoon_net.platform.volcengine",
    "aws": "cocoon_net.platform.aws",
}


def get_platform(name: str, environ: Mapping[str, str]) -> Platform:
    """The platform called name, configured from environ (endpoints, credentials)."""
    module_name = _MODULES.get(name)
    if module_name is None:
        raise UsageError(f"unknown platform {name!r}: expected one of {', '.join(_MODULES)}")
    module = importlib.import_module(module_name)
    platform: Platform = module.create(environ)
    return platform
