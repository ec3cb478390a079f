"""pytest plugin registered through the ``pytest11`` entry point.

Gives every project that installs swarmrt the ``local_swarm`` fixture factory
(see ``swarmrt.testing``).
"""
