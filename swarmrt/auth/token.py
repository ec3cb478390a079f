"""The run's key and the join token that makes a process a member of the run.

- The **run key** is an RSA key that only ``swarmrt bootstrap`` holds (``--run-key FILE``: taken
  when the file exists, else created there; without the flag a fresh key lives as long as the
  bootstrap).
- A **join token** (``--join-token FILE`` or ``$SWARMRT_JOIN_TOKEN``) is what the bootstrap writes
  for peers, trainers and ``swarmrt status``: a member key, an access token for that key signed
  by the run key (hivemind's ``AccessToken``: the DHT lets only its holders in), the run key's
  public half (to check other members' tokens), and the call secret of the stage service (an
  HMAC key derived from the run key, the same in every token of the run). It is a secret: it is
  written with mode 0600 and whoever holds it is a member.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import json
import os
import pathlib

from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarmrt.auth.credential import ENV_VAR
from swarmrt.config import ConfigError

FORMAT = "swarmrt-join-token/1"
DEFAULT_VALID_S = 30 * 24 * 3600.0
"""How long a join token lets its holder in (``swarmrt bootstrap --token-days``)."""
USERNAME = "member"


class TokenError(ConfigError):
    """A run key or join token that is missing, unreadable, forged or expired (the message says which)."""


def key_from_der(der: bytes) -> RSAPrivateKey:
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})
    return key


def load_or_create_run_key(path: str | os.PathLike | None) -> RSAPrivateKey:
    """The run key in ``path`` (base64 DER), created there (mode 0600) when the file does not exist;
    a fresh key kept nowhere when ``path`` is None."""
    if path is None:
        return RSAPrivateKey()
    path = pathlib.Path(path)
    if path.exists():
        try:
            return key_from_der(base64.b64decode(path.read_text().strip(), validate=True))
        except Exception as e:  # any decoding failure: one clear line
            raise TokenError(f"--run-key {path}: not a run key written by swarmrt bootstrap ({e})") from None
    key = RSAPrivateKey()
    _write_secret(path, base64.b64encode(key.to_bytes()).decode() + "\n")
    return key


def _write_secret(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def _token_bytes(token: AccessToken) -> bytes:
    return f"{token.username} ".encode() + token.public_key + f" {token.expiration_time}".encode()


def _expiry(token: AccessToken) -> float:
    return datetime.datetime.fromisoformat(token.expiration_time).timestamp()


def access_token_problem(token: AccessToken, authority: RSAPublicKey, now: float) -> str | None:
    """What is wrong with a member's access token (signature, expiry), or None."""
    try:
        expires = _expiry(token)
    except (TypeError, ValueError):
        return f"access token with a malformed expiration time {token.expiration_time!r:.40}"
    if not authority.verify(_token_bytes(token), token.signature):
        return "access token not signed by this run's key"
    if expires <= now:
        return f"access token expired {now - expires:.0f} s ago"
    return None


@dataclasses.dataclass(frozen=True)
class JoinToken:
    """What a member holds (see the module's docstring)."""

    authority: bytes
    """The run key's public half (OpenSSH format)."""
    member_key: RSAPrivateKey
    access_token: AccessToken
    call_secret: bytes
    """HMAC key of the stage service's per-call credential (:mod:`swarmrt.auth.credential`)."""

    @property
    def expires(self) -> float:
        return _expiry(self.access_token)

    def authority_key(self) -> RSAPublicKey:
        return RSAPublicKey.from_bytes(self.authority)

    def to_text(self) -> str:
        return json.dumps({"format": FORMAT, "authority": self.authority.decode(),
                           "member_key": base64.b64encode(self.member_key.to_bytes()).decode(),
                           "access_token": base64.b64encode(self.access_token.SerializeToString()).decode(),
                           "call_secret": self.call_secret.hex()}, indent=1) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the token to ``path`` atomically, mode 0600."""
        _write_secret(pathlib.Path(path), self.to_text())

    @classmethod
    def load(cls, path: str | os.PathLike, now: float) -> "JoinToken":
        """The token in ``path``; :class:`TokenError` naming the file and what is wrong with it
        (unreadable, not a join token, forged, expired at ``now``)."""
        where = f"join token {path}"
        try:
            data = json.loads(pathlib.Path(path).read_text())
        except OSError as e:
            raise TokenError(f"{where}: cannot read it ({e.strerror})") from None
        except ValueError:
            raise TokenError(f"{where}: not JSON (not a file written by swarmrt bootstrap)") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TokenError(f"{where}: not a {FORMAT} file (written by swarmrt bootstrap)")
        try:
            token = AccessToken.FromString(base64.b64decode(data["access_token"], validate=True))
            made = cls(authority=data["authority"].encode(),
                       member_key=key_from_der(base64.b64decode(data["member_key"], validate=True)),
                       access_token=token, call_secret=bytes.fromhex(data["call_secret"]))
            authority = made.authority_key()
        except Exception as e:  # a missing field, bad base64, a bad key: one clear line
            raise TokenError(f"{where}: damaged ({type(e).__name__}: {e})") from None
        problem = access_token_problem(made.access_token, authority, now)
        if problem is None and made.access_token.public_key != made.member_key.get_public_key().to_bytes():
            problem = "access token issued for another member key"
        if problem is not None:
            raise TokenError(f"{where}: {problem} (ask the run's bootstrap for a new one)")
        return made


def call_secret(run_key: RSAPrivateKey) -> bytes:
    """The stage service's HMAC key: derived from the run key, so every token of the run shares it."""
    return hmac.new(run_key.to_bytes(), b"swarmrt call secret v1", hashlib.sha256).digest()


def issue_token(run_key: RSAPrivateKey, now: float, valid_s: float = DEFAULT_VALID_S) -> JoinToken:
    """A new join token of the run: a fresh member key with an access token valid for ``valid_s``."""
    if not valid_s > 0:
        raise TokenError(f"a join token must be valid for a positive time, got {valid_s} s")
    member = RSAPrivateKey()
    expires = datetime.datetime.fromtimestamp(now + valid_s, tz=datetime.timezone.utc).isoformat()
    token = AccessToken(username=USERNAME, public_key=member.get_public_key().to_bytes(), expiration_time=expires)
    token.signature = run_key.sign(_token_bytes(token))
    return JoinToken(authority=run_key.get_public_key().to_bytes(), member_key=member, access_token=token,
                     call_secret=call_secret(run_key))


def token_path(cli_value: str | None) -> str | None:
    """The join token file from a ``--join-token`` flag, else from ``$SWARMRT_JOIN_TOKEN``, else None."""
    return cli_value or os.environ.get(ENV_VAR) or None


def require_token(cli_value: str | None, now: float) -> JoinToken:
    """The join token a member role starts with; :class:`TokenError` saying how to pass one when none is given."""
    path = token_path(cli_value)
    if path is None:
        raise TokenError(f"no join token: pass --join-token FILE or set {ENV_VAR} (the file `swarmrt bootstrap` "
                         "writes with --join-token)")
    return JoinToken.load(path, now)
