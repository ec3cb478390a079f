"""Runtime loops: stage peer, trainer, demo, signals."""
