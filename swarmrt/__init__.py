"""swarmrt: train standard PyTorch models on slow, uneven, preemptible hardware.

One package per idea (docs/architecture.md has the picture and the rules that
tests/unit/test_layout.py enforces):

- ``wire``: the gRPC contract, tensor codecs, the tensor wire format, client, server, network emulation.
- ``discovery``: DHT records: announce, read, validate.
- ``pipeline``: the stage worker (forward, backward, recompute, apply) and the stage service.
- ``routing``: path rules, routing policies (the full SWARM pipeline is one), peer table, the live view.
- ``sim``: scenarios, the event-driven simulator, the iteration planner, ``swarmrt plan|simulate``.
- ``local_sgd``: its config section, DiLoCo math, averaging, the outer loop.
- ``checkpoint``: when to write (policy), how (store), who (checkpointer).
- ``roles``: bootstrap, peer, trainer: thin loops over the parts above; process plumbing.
- ``models``, ``data``, ``config``, ``cli``.
- ``localswarm``: a whole swarm of real processes on this machine (``swarmrt demo``, fault plans).
- ``testing``: the pytest plugin and assertions for users' tests (and ours).

Decision and math modules are pure: time and randomness are arguments.
"""

__version__ = "0.1.0"
