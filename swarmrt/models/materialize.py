"""Per-stage materialization: build the model without its weights, then give real weights only to
the layers a stage serves.

The user's model is built by its own factory while :func:`parameters_on_meta` is active: every
parameter is created on the ``meta`` device (shape and dtype, no memory), buffers stay real (they
are small, and some, like rotary frequencies, are computed once in ``__init__`` and cannot be
recomputed generically). Then :func:`materialize` gives the chosen layers real parameters and
initialises them, layer by layer, with a generator seeded by ``(run seed, layer index)``: every
peer of a stage gets the same weights without building the rest of the model, and the whole model
built this way (:func:`swarmrt.models.build.build_model`) holds exactly the weights the stages hold.

How a layer is initialised: a Hugging Face ``PreTrainedModel`` re-runs its own ``_init_weights``
on every submodule of the layer (children first, as ``PreTrainedModel.initialize_weights`` does, so
GPT-2's scaled residual projections keep their scale); any other module calls
``reset_parameters()`` on each submodule that owns parameters. A submodule that owns parameters and
has neither cannot be initialised from the meta device: :class:`CannotMaterialize` says which, and
the caller builds the model for real instead.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn


class CannotMaterialize(TypeError):
    """A layer's parameters cannot be initialised from the meta device (the message names the module)."""


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within this block, every parameter a module registers is moved to the ``meta`` device.

    The same trick as ``accelerate.init_empty_weights(include_buffers=False)``: a layer's parameter is
    allocated for an instant by its constructor, then replaced by a meta tensor, so building the
    whole model costs one layer's memory at most. Buffers are left alone.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param) -> None:
        original(module, name, param)
        param = module._parameters.get(name)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def layer_seed(seed: int, index: int) -> int:
    """The seed of layer ``index``'s init in a run seeded ``seed`` (stable across processes)."""
    digest = hashlib.sha256(f"swarmrt-init:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _post_order(module: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for child in module.children():
        out.extend(_post_order(child))
    out.append(module)
    return out


def _initializer(root: nn.Module) -> Callable[[nn.Module], None]:
    """How one submodule of ``root`` is initialised (see the module docstring)."""
    hf_init = getattr(root, "_init_weights", None)
    if hf_init is not None and hasattr(root, "config"):  # a transformers PreTrainedModel
        return hf_init

    def reset(module: nn.Module) -> None:
        if not any(p is not None for p in module._parameters.values()):
            return
        if not callable(getattr(module, "reset_parameters", None)):
            raise CannotMaterialize(f"{type(module).__name__} owns parameters but has no reset_parameters(), "
                                    "so it cannot be initialised from the meta device")
        module.reset_parameters()

    return reset


def check_materializable(root: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Raise :class:`CannotMaterialize` when some layer could not be initialised by :func:`materialize`."""
    if getattr(root, "_init_weights", None) is not None and hasattr(root, "config"):
        return
    for layer in layers:
        for module in layer.modules():
            if any(p is not None for p in module._parameters.values()) \
                    and not callable(getattr(module, "reset_parameters", None)):
                raise CannotMaterialize(f"{type(module).__name__} owns parameters but has no reset_parameters(), "
                                        "so it cannot be initialised from the meta device")


def _give_storage(layer: nn.Module, device: torch.device, made: dict[int, nn.Parameter]) -> None:
    """Replace the layer's meta parameters by uninitialised real ones; ``made`` keeps shared ones shared."""
    for module in layer.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            real = made.get(id(param))
            if real is None:
                real = type(param)(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                made[id(param)] = real
            module._parameters[name] = real


def materialize(root: nn.Module, layers: Sequence[nn.Module], indices: Sequence[int], seed: int,
                device: torch.device | str = "cpu",
                load: Callable[[dict[int, list[nn.Parameter]]], None] | None = None) -> None:
    """Give ``layers`` (layer number ``indices[i]`` of ``root``) real parameters on ``device``.

    Without ``load``: each layer is initialised with :func:`layer_seed` ``(seed, index)``. With
    ``load``: it is called once with the new parameters and must fill them (pretrained weights).
    A parameter shared by two of ``layers`` stays one parameter.
    """
    check_materializable(root, layers)
    device = torch.device(device)
    made: dict[int, nn.Parameter] = {}
    for layer in layers:
        _give_storage(layer, device, made)
    if load is not None:
        load(made)
        return
    init = _initializer(root)
    done: set[int] = set()
    with torch.no_grad():
        for layer, index in zip(layers, indices):
            params = list(layer.parameters())
            if not params or all(id(p) in done for p in params):
                continue
            kept = [(p, p.detach().clone()) for p in params if id(p) in done]  # shared with an earlier layer
            torch.manual_seed(layer_seed(seed, index))
            for module in _post_order(layer):
                init(module)
            for param, value in kept:
                param.copy_(value)
            done.update(id(p) for p in params)
