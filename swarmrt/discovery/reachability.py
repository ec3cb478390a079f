"""Can the others reach a joining peer? Who to ask, and what their answers mean (pure).

Before it announces ``serving``, a peer asks a few peers already in the run (and
the bootstraps it joined through) to dial its announced gRPC address back and
call ``Info`` there (:func:`swarmrt.wire.p2p.ask_dial_back`, over libp2p). The
answer must come from this very peer (its id), not from whatever else listens at
that address. :func:`verdict` turns the answers into one decision and one line:

- someone reached it (a peer of the run; a bootstrap only when no peer of
  the run answered): serve over gRPC (the fast path);
- nobody could (but some answered): the address is wrong or closed; the line
  says how to fix it (announce host, port forward, relay), and the peer either
  serves over libp2p instead (``network.reachability = "p2p"``) or exits
  (``"fail"``);
- nobody answered at all (no other peer yet): unchecked, serve as announced.

Time and randomness come in as arguments; nothing here touches the network.
"""

from __future__ import annotations

import random
from typing import Iterable, Mapping


class NetworkError(RuntimeError):
    """A peer cannot take part from this network position; the message is one line with the fix."""


class Unreachable(NetworkError):
    """Nobody in the run could dial this peer's announced address (``network.reachability = "fail"``)."""


REACHABLE, UNREACHABLE, UNCHECKED = "reachable", "unreachable", "unchecked"


def peer_id_of_maddr(maddr: str) -> str | None:
    """The peer id at the end of a multiaddr (``.../p2p/ID``), or None."""
    parts = maddr.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] in ("p2p", "ipfs") and parts[-1] else None


def choose_dialers(serving: Iterable[str], bootstraps: Iterable[str], self_id: str, rng: random.Random,
                   limit: int = 3) -> list[str]:
    """Up to ``limit`` peers of the run to ask (a random sample of ``serving``, so one peer is not
    asked by every joiner), then the bootstraps (they answer too, so the first peer is checked)."""
    peers = sorted({p for p in serving if p and p != self_id})
    chosen = rng.sample(peers, min(limit, len(peers)))
    return chosen + [b for b in dict.fromkeys(bootstraps) if b and b != self_id and b not in chosen]


def fix_hint(address: str) -> str:
    port = address.rpartition(":")[2]
    return (f"announce an address others can dial (--announce-host PUBLIC_IP, or network.announce_host), "
            f"open or forward TCP port {port} to this machine, or serve through libp2p "
            f"(network.reachability = \"p2p\"; --use-auto-relay behind NAT)")


def verdict(address: str, self_id: str, answers: Mapping[str, Mapping[str, str]],
            bootstraps: Iterable[str] = ()) -> tuple[str, str]:
    """``(REACHABLE | UNREACHABLE | UNCHECKED, one line)`` from :func:`ask_dial_back`'s answers.
    The bootstraps' answers count only when no peer of the run answered: a bootstrap may sit on
    both sides of a NAT (a relay does), and the trainers and peers are who must reach the address."""
    bootstraps = set(bootstraps)
    if any("no_answer" not in a for p, a in answers.items() if p not in bootstraps):
        answers = {p: a for p, a in answers.items() if p not in bootstraps}
    reached = sorted(p for p, a in answers.items() if a.get("peer_id") == self_id)
    if reached:
        return REACHABLE, f"{address} is reachable: dialled back by {', '.join(reached)}"
    tried = {p: a for p, a in answers.items() if "no_answer" not in a}
    if not tried:
        why = "no other peer to ask" if not answers else "nobody answered the dial-back request"
        return UNCHECKED, f"could not check that others can reach {address} ({why})"
    reasons = _reasons(tried.values())
    return UNREACHABLE, (f"nobody in the run can reach this peer at {address} ({len(tried)} asked: {reasons}); "
                         f"fix: {fix_hint(address)}")


def _reasons(answers: Iterable[Mapping[str, str]]) -> str:
    seen = []
    for a in answers:
        why = f"another peer ({a['peer_id']}) answers there" if "peer_id" in a else a.get("error", "?")
        if why not in seen:
            seen.append(why)
    return "; ".join(seen[:2])
