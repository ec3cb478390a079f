"""Membership of a run: the run key, join tokens, the per-call credential of the stage service and
the DHT's authorizer and record validators. docs/security.md states what this keeps out.

The helpers below take a :class:`~swarmrt.auth.token.JoinToken` or None (an open run, as in
in-process tests) and return what each part plugs in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing the token module imports hivemind: the CLI's other commands need not wait for it
    from swarmrt.auth.token import JoinToken

__all__ = ["dht_kwargs", "record_ttl_cap", "server_interceptors", "client_interceptors", "call_credentials", "p2p_check",
           "DEFAULT_RECORD_TTL_S"]

DEFAULT_RECORD_TTL_S = 4.0
"""``network.record_ttl_s``'s default: what a run entry that declares no ``ttl`` is taken to use."""


def record_ttl_cap(record_ttl_s: float) -> float:
    """The longest expiry a run's record may have (seconds ahead): a record stored further ahead
    would outlive its peer, so it is refused."""
    return max(60.0, 4 * record_ttl_s)


def dht_kwargs(token: "JoinToken | None", run_id: str | None = None,
               record_ttl_s: float = DEFAULT_RECORD_TTL_S) -> dict[str, Any]:
    """Keyword arguments of :func:`swarmrt.discovery.dht.start_dht` for a member (none for an open run)."""
    if token is None:
        return {}
    from swarmrt.auth.dht_auth import dht_security

    return dht_security(token, [run_id] if run_id else [], record_ttl_cap(record_ttl_s))


def server_interceptors(token: "JoinToken | None") -> tuple:
    """The stage service's credential check (first among its interceptors), or none for an open run."""
    if token is None:
        return ()
    from swarmrt.auth.grpc_auth import CredentialServerInterceptor

    return (CredentialServerInterceptor(token.call_secret),)


def client_interceptors(token: "JoinToken | None") -> tuple:
    """What puts the run credential on every call of a :class:`~swarmrt.wire.client.StageClient`."""
    if token is None:
        return ()
    from swarmrt.auth.grpc_auth import credential_interceptors

    return credential_interceptors(token.call_secret)


def p2p_check(token: "JoinToken | None"):
    """The libp2p stage service's credential check, ``check(method, metadata) -> problem or None``
    (None for an open run): the same credential as a gRPC call's, carried in the call's header."""
    if token is None:
        return None
    import time

    from swarmrt.auth.credential import METADATA_KEY, credential_problem

    secret = token.call_secret

    def check(method: str, metadata) -> str | None:
        pairs = metadata if isinstance(metadata, list) else []
        value = next((p[1] for p in pairs if isinstance(p, list) and len(p) == 2 and p[0] == METADATA_KEY), None)
        return credential_problem(value if isinstance(value, (str, bytes)) else None, secret, method, time.time())

    return check


def call_credentials(token: "JoinToken | None"):
    """``StageClient(credentials=...)``: the metadata that carries the run credential on a call of a
    method (None for an open run). Cheaper than :func:`client_interceptors`, which suit raw channels."""
    if token is None:
        return None
    import time

    from swarmrt.auth.credential import METADATA_KEY, make_credential

    secret = token.call_secret
    return lambda method: ((METADATA_KEY, make_credential(secret, method, time.time())),)
