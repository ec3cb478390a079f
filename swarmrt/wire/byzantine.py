"""Byzantine behaviour for rehearsals: a peer that answers, but lies (rules-file entries).

The ``byzantine`` key of a net rules file (:mod:`swarmrt.wire.emulation`) is a
list of lies a peer tells from the moment the entry appears, each with the id
of the fault that planted it::

    "byzantine": [
      {"id": "f3", "kind": "replies", "method": "Forward", "mode": "zeros"},   # or "nan", or
      {"id": "f4", "kind": "replies", "method": "Backward", "mode": "scale", "factor": 1e3},
      {"id": "f5", "kind": "throughput", "value": 1e13},      # announce this many samples/s
      {"id": "f6", "kind": "stale_state"}                      # joiners get the state of this moment
    ]

``replies`` rewrites the tensor of every reply of ``method`` (Forward: its
output; Backward: its grad_input) after the real computation: ``zeros``,
``nan``, or the true values times ``factor`` (``scale``). The peer itself
computes and applies honestly, so only its callers are lied to.
``throughput`` makes the peer announce ``value`` instead of what it measured.
``stale_state`` snapshots the peer's state when the entry appears and serves
that snapshot to every later GetState (a replay of old weights).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch

from swarmrt.config import ConfigError
from swarmrt.wire.tensors import from_proto, to_proto

KINDS = ("replies", "throughput", "stale_state")
MODES = ("zeros", "nan", "scale")
METHODS = ("Forward", "Backward")


@dataclasses.dataclass(frozen=True)
class Lie:
    id: str
    kind: str
    method: str = ""
    mode: str = ""
    factor: float = 1.0
    value: float = 0.0


def parse_lies(raw: Any, where: str, error=ConfigError) -> tuple[Lie, ...]:
    """Validate a ``byzantine`` list; ``error`` (a ConfigError subclass) names the entry and key."""
    if not isinstance(raw, list):
        raise error(f"{where}: must be a list of lies")
    lies = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(entry, Mapping):
            raise error(f"{at}: must be an object")
        unknown = set(entry) - {"id", "kind", "method", "mode", "factor", "value"}
        if unknown:
            raise error(f"{at}.{sorted(unknown)[0]}: unknown key")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise error(f"{at}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        lie = Lie(str(entry.get("id", f"lie{i}")), kind)
        if kind == "replies":
            if entry.get("method") not in METHODS or entry.get("mode") not in MODES:
                raise error(f"{at}: a replies lie needs method in {METHODS} and mode in {MODES}, got "
                            f"{entry.get('method')!r}, {entry.get('mode')!r}")
            factor = entry.get("factor", 1.0)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
                raise error(f"{at}.factor: must be a finite number, got {factor!r}")
            lie = dataclasses.replace(lie, method=entry["method"], mode=entry["mode"], factor=float(factor))
        elif kind == "throughput":
            value = entry.get("value")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise error(f"{at}.value: the samples/s to announce, a number >= 0, got {value!r}")
            lie = dataclasses.replace(lie, value=float(value))
        lies.append(lie)
    return tuple(lies)


def reply_lie(lies: tuple[Lie, ...], method: str) -> Lie | None:
    """The lie told in replies of ``method`` (the last one listed), or None."""
    found = [lie for lie in lies if lie.kind == "replies" and lie.method == method]
    return found[-1] if found else None


def tamper(response, lie: Lie):
    """``response`` (a ForwardResponse or BackwardResponse) with its tensor replaced by the lie; a
    response without that tensor is returned as it is. The lie travels uncompressed."""
    field = "output" if lie.method == "Forward" else "grad_input"
    if not response.HasField(field):
        return response
    true = from_proto(getattr(response, field), field)
    fake = {"zeros": lambda t: torch.zeros_like(t), "nan": lambda t: torch.full_like(t, float("nan")),
            "scale": lambda t: t * lie.factor}[lie.mode](true)
    copy = type(response)()
    copy.CopyFrom(response)
    getattr(copy, field).CopyFrom(to_proto(fake, "none"))
    return copy
