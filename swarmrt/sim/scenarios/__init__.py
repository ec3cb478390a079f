"""Network scenarios shipped with swarmrt (format: docs/benchmarks-skip.md, shared/scenarios/README.md).

``geo-aws18.json``: 18 nodes in 11 regions, 4 stages, 3 visited; SkipPipe's published
DT-FM-style network table. ``path("geo-aws18")`` gives the file's path.
"""

import importlib.resources
import pathlib


def path(name: str) -> str:
    file = pathlib.Path(str(importlib.resources.files("swarmrt.sim.scenarios") / f"{name}.json"))
    if not file.is_file():
        raise FileNotFoundError(f"no shipped scenario {name!r}")
    return str(file)
