"""Example model factories and the adapters that turn a standard model into a layer list.

A factory named in the run config (``package.module:function``) returns a plain
``nn.Module``; :func:`swarmrt.models.layers.as_layers` cuts it into layers.
"""

from swarmrt.models.examples import mlp, tiny_gpt2, tiny_llama

__all__ = ["mlp", "tiny_gpt2", "tiny_llama"]
