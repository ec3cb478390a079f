"""Network scenarios shipped with swarmrt, as package data (the format: docs/scenarios.md).

``geo-aws18.json``: 18 nodes in 11 regions, 4 stages of which each microbatch visits 3,
stage 0 also last; SkipPipe's published inter-region latency and bandwidth table and
constants. docs/benchmarks-skip.md has what each routing policy does on it.

``path("geo-aws18")`` gives the file's path, in a checkout or an installed package.
"""

import importlib.resources
import pathlib


def path(name: str) -> str:
    """The file of the shipped scenario ``name`` (``"geo-aws18"``); FileNotFoundError names a missing one."""
    file = pathlib.Path(str(importlib.resources.files("swarmrt.sim.scenarios") / f"{name}.json"))
    if not file.is_file():
        raise FileNotFoundError(f"no shipped scenario {name!r}")
    return str(file)
