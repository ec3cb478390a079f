"""The per-call credential of the stage service (pure: stdlib ``hmac``; the time is passed in).

Every gRPC call of a member carries one metadata entry, :data:`METADATA_KEY`:
``v1 <unix time, ms> <hex HMAC-SHA256 of "<method>|<time>">``, keyed with the run's call secret
(from the join token, :mod:`swarmrt.auth.token`). A peer checks it before the request is even
decoded (:mod:`swarmrt.auth.grpc_auth`); :func:`credential_problem` says what is wrong, in words
a user can act on. The time bounds a replay to :data:`MAX_SKEW_S` seconds either side.
"""

from __future__ import annotations

import hashlib
import hmac

ENV_VAR = "SWARMRT_JOIN_TOKEN"
"""The environment variable a member role reads its join token's path from (``--join-token`` wins)."""
METADATA_KEY = "x-swarmrt-credential"
VERSION = "v1"
MAX_SKEW_S = 60.0
"""How far a credential's time may be from the checking peer's clock (replay window and clock skew)."""
_MAX_LEN = 128
HOW_TO_JOIN = "start the caller with --join-token FILE or SWARMRT_JOIN_TOKEN (the file `swarmrt bootstrap` writes)"


def _mac(secret: bytes, method: str, millis: int) -> str:
    return hmac.new(secret, f"{method}|{millis}".encode(), hashlib.sha256).hexdigest()


def make_credential(secret: bytes, method: str, now: float) -> str:
    """The metadata value for one call of ``method`` (e.g. ``/swarmrt.Stage/Forward``) at ``now``."""
    millis = int(now * 1000)
    return f"{VERSION} {millis} {_mac(secret, method, millis)}"


def credential_problem(value: str | bytes | None, secret: bytes, method: str, now: float,
                       max_skew_s: float = MAX_SKEW_S) -> str | None:
    """What is wrong with a call's credential (``value``: its :data:`METADATA_KEY` metadata, None
    when absent), or None when it is good."""
    if value is None:
        return f"no run credential ({METADATA_KEY} metadata is missing): {HOW_TO_JOIN}"
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    parts = value.split(" ") if len(value) <= _MAX_LEN else []
    if len(parts) != 3 or parts[0] != VERSION or not parts[1].isdigit():
        return f"malformed run credential ({METADATA_KEY} must be '{VERSION} <ms> <hmac>')"
    millis = int(parts[1])
    if not hmac.compare_digest(parts[2], _mac(secret, method, millis)):
        return f"run credential not signed with this run's key (a join token of another run?): {HOW_TO_JOIN}"
    skew = abs(now - millis / 1000)
    if skew > max_skew_s:
        return (f"run credential is {skew:.0f} s away from this peer's clock (more than {max_skew_s:.0f} s: "
                "a replayed call, or clocks out of sync)")
    return None
