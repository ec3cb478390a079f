"""swarmrt: train standard PyTorch models on slow, uneven, preemptible hardware.

Layers (see docs/architecture.md):

- ``swarmrt.core``: pure decisions and math (routing, partitioning, config,
  compression, local SGD, skip scheduling, simulation). No network, process
  or clock code; time and randomness are arguments.
- ``swarmrt.net``: gRPC stage service, tensor wire format, DHT records.
- ``swarmrt.runtime``: the loops: stage peer, trainer, demo.
- ``swarmrt.testing``: local swarms and fault injection for users' tests.
"""

__version__ = "0.1.0"
