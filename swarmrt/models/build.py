"""Build the model a run config names and cut it into stage modules."""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import torch
from torch import nn

from swarmrt.config import ConfigError, RunConfig
from swarmrt.imports import resolve
from swarmrt.pipeline.worker import InputSpec, InputSpecs, infer_input_spec
from swarmrt.models.partition import balanced_ranges, validate_ranges
from swarmrt.models.layers import TiedEnds, as_layers, can_skip, layer_costs
from swarmrt.models.precision import default_device, place, wire_dtype
from swarmrt.models.materialize import CannotMaterialize, check_materializable, materialize, parameters_on_meta


def resolve_factory(spec: str):
    """Import ``package.module:function``; a clear :class:`ConfigError` when it is not there."""
    return resolve(spec, "model.factory")


def _call_factory(config: RunConfig) -> nn.Module:
    """The user's model as its factory (or ``model.pretrained``'s config) builds it, in the current context."""
    if config.model.pretrained is not None:
        from swarmrt.models.hf import pretrained_skeleton

        return pretrained_skeleton(config.model.pretrained)
    factory = resolve_factory(config.model.factory)
    torch.manual_seed(config.run.seed)
    try:
        model = factory(**dict(config.model.kwargs))
    except TypeError as e:
        raise ConfigError(f"model.kwargs: {config.model.factory} rejected them: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory: {config.model.factory} returned {type(model).__name__}, not an nn.Module")
    return model


def _cut(model: nn.Module) -> list[nn.Module]:
    try:
        return as_layers(model)
    except TypeError as e:
        raise ConfigError(f"model.factory: {e}") from None


def _stage_indices(ranges: list[tuple[int, int]], stage: int, num_layers: int, tied: bool) -> list[int]:
    """The layer numbers stage ``stage`` holds: its range, with the head moved to stage 0 when ``tied``."""
    start, end = ranges[stage]
    indices = list(range(start, end))
    if tied and stage == len(ranges) - 1:
        indices.remove(num_layers - 1)
    if tied and stage == 0:
        indices.append(num_layers - 1)
    return indices


def materialized(config: RunConfig, stage: int | None):
    """``(model, layers, ranges, tied, indices)`` with real weights only in the layers ``indices``
    that ``stage`` holds (all layers when None).

    The model is built with its parameters on the meta device and only the wanted layers are
    materialized (:mod:`swarmrt.models.materialize`): seeded per layer, or read from
    ``model.pretrained``. A model whose layers cannot be initialised from meta is built for real
    (every peer then pays for the whole model, but gets the same weights).
    """
    with parameters_on_meta():
        model = _call_factory(config)
    layers = _cut(model)
    ranges = stage_ranges(config, layers)
    tied = tie_plan(config, model, layers, ranges)
    indices = list(range(len(layers))) if stage is None else _stage_indices(ranges, stage, len(layers), tied)
    load = None
    if config.model.pretrained is not None:
        from swarmrt.models.hf import load_pretrained

        load = functools.partial(load_pretrained, config.model.pretrained, model)
    try:
        check_materializable(model, layers)  # all of them: every stage, and the whole model, decide alike
    except CannotMaterialize:
        model = _call_factory(config)
        return model, _cut(model), ranges, tied, indices
    materialize(model, [layers[i] for i in indices], indices, config.run.seed, "cpu", load)
    return model, layers, ranges, tied, indices


def build_model(config: RunConfig) -> nn.Module:
    """The user's own model (what the factory returns) holding the run's initial weights: the same
    weights, layer by layer, as every stage peer materializes for its stage."""
    return materialized(config, None)[0]


def build_layers(config: RunConfig) -> list[nn.Module]:
    """:func:`build_model` cut into its flat list of layers."""
    return materialized(config, None)[1]


def _shapes(config: RunConfig) -> tuple[nn.Module, list[nn.Module]]:
    """The model and its layers on the meta device: shapes and dtypes, no memory, no init (a factory
    that cannot build on meta is built for real)."""
    try:
        with torch.device("meta"):
            model = _call_factory(config)
    except ConfigError:
        raise
    except Exception:  # a factory or layer that does not build on meta
        model = build_model(config)
    return model, _cut(model)


def shape_layers(config: RunConfig) -> list[nn.Module]:
    """:func:`_shapes`' layers."""
    return _shapes(config)[1]


def stage_ranges(config: RunConfig, layers: list[nn.Module]) -> list[tuple[int, int]]:
    try:
        if config.model.layer_ranges is not None:
            return validate_ranges(config.model.layer_ranges, len(layers))
        return balanced_ranges(layer_costs(layers), config.model.stages)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def tie_plan(config: RunConfig, model: nn.Module, layers: list[nn.Module], ranges: list[tuple[int, int]]) -> bool:
    """Whether the head runs on stage 0 to keep weights tied (:class:`~swarmrt.models.layers.TiedEnds`).

    True when some parameter is shared by layers of two stages and every such sharing is between
    stage 0's layers and the last layer (a language model's tied embedding and head). Any other
    sharing across stages is a :class:`ConfigError` naming the weight: each stage would train its own
    copy, and the run would silently train a different model than the user's.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    users: dict[int, set[int]] = {}
    for index, layer in enumerate(layers):
        for param in layer.parameters():
            users.setdefault(id(param), set()).add(index)
    stage_of = {i: s for s, (start, end) in enumerate(ranges) for i in range(start, end)}
    last, first_end = len(layers) - 1, ranges[0][1]
    tied = False
    for pid, indices in users.items():
        if len({stage_of[i] for i in indices}) < 2:
            continue
        weight = " = ".join(names.get(pid, ["<unnamed>"]))
        if not all(i < first_end or i == last for i in indices):
            raise ConfigError(
                f"model: the weight {weight} is shared by layers {sorted(indices)} on stages "
                f"{sorted({stage_of[i] for i in indices})}; only weights shared by stage 0 and the last layer (a tied "
                "embedding and head) can be kept tied. Untie it, or set model.layer_ranges so one stage holds "
                "every layer that uses it")
        tied = True
    if tied:
        if config.data.kind != "text":
            raise ConfigError(f"model: the first and last layers share weights (tied), which swarmrt keeps tied by "
                              f"running the head on stage 0; that needs token ids as input (data.kind = 'text'), "
                              f"not {config.data.kind!r}")
        if ranges[-1][1] - ranges[-1][0] < 2:
            raise ConfigError(f"model: the head shares weights with stage 0 and runs there, which would leave the "
                              f"last stage (layers {ranges[-1][0]}..{last}) empty; give it more layers")
    return tied


def tied_ends(config: RunConfig) -> bool:
    """Whether a microbatch of this run ends on stage 0 (its head is tied to stage 0's embedding)."""
    model, layers = _shapes(config)
    return tie_plan(config, model, layers, stage_ranges(config, layers))


def build_stage(config: RunConfig, stage: int, device: torch.device | str | None = None) -> nn.Module:
    """The module of the layers that stage ``stage`` serves (an ``nn.Sequential``, or a
    :class:`~swarmrt.models.layers.TiedEnds` for stage 0 of a tied model); only they get real weights.

    The weights are made on the CPU (the same on every device) and then the module is placed on
    ``device`` (default: CUDA when present) in ``model.precision`` (:func:`swarmrt.models.precision.place`).
    """
    if not 0 <= stage < config.num_stages:
        raise ConfigError(f"stage {stage} does not exist: the run has stages 0..{config.num_stages - 1}")
    _, layers, ranges, tied, _ = materialized(config, stage)
    return place(stage_module(layers, ranges, tied, stage), device or default_device(), config.model.precision)


def stage_module(layers: list[nn.Module], ranges: list[tuple[int, int]], tied: bool, stage: int) -> nn.Module:
    """The module stage ``stage`` serves, over ``layers`` (no copy: it shares their parameters)."""
    indices = _stage_indices(ranges, stage, len(layers), tied)
    if tied and stage == 0:
        return TiedEnds(nn.Sequential(*[layers[i] for i in indices[:-1]]), layers[indices[-1]])
    return nn.Sequential(*[layers[i] for i in indices])


def partition_hash(config: RunConfig, ranges: list[tuple[int, int]] | None = None) -> str:
    """Short hash of what each stage holds (factory, kwargs, layer ranges, a tied head on stage 0):
    checkpoints check it. Builds the model on the meta device (shapes only)."""
    model, layers = _shapes(config)
    if ranges is None:
        ranges = stage_ranges(config, layers)
    what = (config.model.factory, sorted(dict(config.model.kwargs).items()), [tuple(r) for r in ranges])
    if config.model.pretrained is not None:
        what += (config.model.pretrained,)
    if tie_plan(config, model, layers, ranges):
        what += ("tied head on stage 0",)
    return hashlib.sha256(repr(what).encode()).hexdigest()[:12]


def skip_compatibility(config: RunConfig) -> tuple[bool, str]:
    """Whether the run's stages may be skipped (:func:`swarmrt.models.layers.can_skip`), and why (not).

    Builds the model on the meta device (shapes only: no memory, no compute);
    a model that cannot be built there is built for real.
    """
    from swarmrt.data import sample_input

    if config.num_stages < 3:
        return False, (f"skipping needs at least 3 stages (the first and last are never skipped), "
                       f"the model has {config.num_stages}")
    _, layers, sample = _runnable(config)
    try:
        return can_skip(layers, stage_ranges(config, layers), sample)
    except Exception:  # a layer that does not run on meta: check on real tensors
        layers = build_layers(config)
        return can_skip(layers, stage_ranges(config, layers), sample_input(config.data))


def _runnable(config: RunConfig) -> tuple[nn.Module, list[nn.Module], torch.Tensor]:
    """:func:`_shapes` and a one-sample input on the same device (meta, unless the model did not build there)."""
    from swarmrt.data import sample_input

    model, layers = _shapes(config)
    on_meta = any(p.is_meta for layer in layers for p in layer.parameters())
    sample = sample_input(config.data)
    return model, layers, sample.to("meta") if on_meta else sample


def output_specs(config: RunConfig) -> tuple[list[tuple[torch.dtype, tuple[int, ...]]],
                                              tuple[torch.dtype, tuple[int, ...]] | None]:
    """What each stage's output must look like, as ``(dtype on the wire, shape after the batch
    dimensions)`` per stage, and the tied head's (None when the model is not tied): learnt by running
    a one-sample input through the layers (on the meta device where the model builds there). A
    trainer checks every reply against them."""
    model, layers, sample = _runnable(config)
    ranges = stage_ranges(config, layers)
    tied = tie_plan(config, model, layers, ranges)
    batch_dims = 2 if sample.dtype == torch.long else 1

    def spec(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
        return wire_dtype(config.model.precision, t.dtype), tuple(t.shape[batch_dims:])

    x, specs = sample, []
    with torch.no_grad():
        for stage in range(len(ranges)):
            body = [i for i in _stage_indices(ranges, stage, len(layers), tied) if not (tied and i == len(layers) - 1)]
            for i in body:
                x = layers[i](x)
            specs.append(spec(x))
        head = spec(layers[-1](x)) if tied else None
    return specs, head


def stage_input_spec(config: RunConfig, stage: int) -> InputSpec | InputSpecs:
    """What stage ``stage`` takes, learnt by running a one-sample input through the layers before it
    (on the meta device where the model builds there). Stage 0 of a tied model also takes the hidden
    states its head runs on."""
    model, layers, sample = _runnable(config)
    ranges = stage_ranges(config, layers)
    specs = [infer_input_spec(layers[:ranges[stage][0]], sample)]
    if stage == 0 and tie_plan(config, model, layers, ranges):
        specs.append(infer_input_spec(layers[:-1], sample))
    specs = [dataclasses.replace(s, dtype=wire_dtype(config.model.precision, s.dtype)) for s in specs]
    return specs[0] if len(specs) == 1 else InputSpecs(tuple(specs))


def check_skip(config: RunConfig) -> None:
    """Raise a :class:`ConfigError` naming ``routing.skip_ratio`` when it is set but the model cannot skip."""
    if config.routing.skip_ratio <= 0:
        return
    ok, why = skip_compatibility(config)
    if not ok:
        raise ConfigError(f"routing.skip_ratio: {config.routing.skip_ratio} needs middle stages that can be "
                          f"skipped, but {why}; set routing.skip_ratio = 0 or cut the model differently")
