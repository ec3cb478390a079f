"""Build the model a run config names and cut it into stage modules."""

from __future__ import annotations

import functools
import hashlib
import importlib

import torch
from torch import nn

from swarmrt.config import ConfigError, RunConfig
from swarmrt.models.partition import balanced_ranges, validate_ranges
from swarmrt.models.layers import as_layers, can_skip, layer_costs
from swarmrt.models.materialize import CannotMaterialize, materialize, parameters_on_meta


def resolve_factory(spec: str):
    """Import ``package.module:function``; a clear :class:`ConfigError` when it is not there."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model.factory: cannot import module {module_name!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model.factory: {module_name!r} has no callable {attr!r}")
    return factory


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


def _materialized(config: RunConfig, stage: int | None, device: torch.device | str = "cpu") -> tuple[nn.Module, list[nn.Module], list[tuple[int, int]]]:
    """``(model, layers, ranges)`` with real weights only in ``stage``'s layers (all of them when None).

    The model is built with its parameters on the meta device and only the wanted layers are
    materialized (:mod:`swarmrt.models.materialize`): seeded per layer, or read from
    ``model.pretrained``. A model whose layers cannot be initialised from meta is built for real
    (every peer then pays for the whole model, but gets the same weights).
    """
    with parameters_on_meta():
        model = _call_factory(config)
    layers = _cut(model)
    ranges = stage_ranges(config, layers)
    check_ties(model, layers, ranges)
    start, end = (0, len(layers)) if stage is None else ranges[stage]
    load = None
    if config.model.pretrained is not None:
        from swarmrt.models.hf import load_pretrained

        load = functools.partial(load_pretrained, config.model.pretrained, model)
    try:
        materialize(model, layers[start:end], range(start, end), config.run.seed, device, load)
    except CannotMaterialize:
        model = _call_factory(config).to(device)
        layers = _cut(model)
    return model, layers, ranges


def build_model(config: RunConfig) -> nn.Module:
    """The user's own model (what the factory returns) holding the run's initial weights: the same
    weights, layer by layer, as every stage peer materializes for its stage."""
    return _materialized(config, None)[0]


def build_layers(config: RunConfig) -> list[nn.Module]:
    """:func:`build_model` cut into its flat list of layers."""
    return _materialized(config, None)[1]


def shape_layers(config: RunConfig) -> list[nn.Module]:
    """The layers on the meta device: shapes and dtypes, no memory, no init (a factory that cannot
    build on meta is built for real)."""
    try:
        with torch.device("meta"):
            return _cut(_call_factory(config))
    except ConfigError:
        raise
    except Exception:  # a factory or layer that does not build on meta
        return build_layers(config)


def stage_ranges(config: RunConfig, layers: list[nn.Module]) -> list[tuple[int, int]]:
    try:
        if config.model.layer_ranges is not None:
            return validate_ranges(config.model.layer_ranges, len(layers))
        return balanced_ranges(layer_costs(layers), config.model.stages)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def check_ties(model: nn.Module, layers: list[nn.Module], ranges: list[tuple[int, int]]) -> None:
    """Raise a :class:`ConfigError` when a parameter is shared by layers of two stages (tied weights,
    e.g. GPT-2's or Llama-3.2's embedding and head): each stage would train its own copy, and the
    run would silently train a different model than the user's."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    where: dict[int, set[int]] = {}
    for stage, (start, end) in enumerate(ranges):
        for layer in layers[start:end]:
            for param in layer.parameters():
                where.setdefault(id(param), set()).add(stage)
    for pid, stages in where.items():
        if len(stages) > 1:
            tied = " = ".join(names.get(pid, ["<unnamed>"]))
            raise ConfigError(
                f"model: the weight {tied} is shared (tied) between stages {sorted(stages)}; each stage would "
                "train its own copy and the run would not train your model. Untie it in the model's config "
                "(e.g. tie_word_embeddings=False), or set model.layer_ranges so one stage holds every layer "
                "that uses it")


def build_stage(config: RunConfig, stage: int, device: torch.device | str = "cpu") -> nn.Sequential:
    """The ``nn.Sequential`` of the layers that stage ``stage`` serves; only they get real weights."""
    if not 0 <= stage < config.num_stages:
        raise ConfigError(f"stage {stage} does not exist: the run has stages 0..{config.num_stages - 1}")
    _, layers, ranges = _materialized(config, stage, device)
    start, end = ranges[stage]
    return nn.Sequential(*layers[start:end])


def partition_hash(config: RunConfig, ranges: list[tuple[int, int]] | None = None) -> str:
    """Short hash of what each stage holds (factory, kwargs, layer ranges): checkpoints check it.
    Pass ``ranges`` when they are already known, to avoid building the model again."""
    if ranges is None:
        ranges = stage_ranges(config, shape_layers(config))
    what = (config.model.factory, sorted(dict(config.model.kwargs).items()), [tuple(r) for r in ranges])
    if config.model.pretrained is not None:
        what += (config.model.pretrained,)
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
    layers, sample = _runnable(config)
    try:
        return can_skip(layers, stage_ranges(config, layers), sample)
    except Exception:  # a layer that does not run on meta: check on real tensors
        layers = build_layers(config)
        return can_skip(layers, stage_ranges(config, layers), sample_input(config.data))


def _runnable(config: RunConfig) -> tuple[list[nn.Module], torch.Tensor]:
    """:func:`shape_layers` and a one-sample input on the same device (meta, unless the model did not build there)."""
    from swarmrt.data import sample_input

    layers = shape_layers(config)
    on_meta = any(p.is_meta for layer in layers for p in layer.parameters())
    sample = sample_input(config.data)
    return layers, sample.to("meta") if on_meta else sample


def layers_before(config: RunConfig, stage: int) -> tuple[list[nn.Module], torch.Tensor]:
    """The layers before ``stage`` (shapes only where the model builds on meta) and a one-sample input
    for them: what :func:`swarmrt.pipeline.worker.infer_input_spec` needs to learn the stage's input."""
    layers, sample = _runnable(config)
    return layers[:stage_ranges(config, layers)[stage][0]], sample


def check_skip(config: RunConfig) -> None:
    """Raise a :class:`ConfigError` naming ``routing.skip_ratio`` when it is set but the model cannot skip."""
    if config.routing.skip_ratio <= 0:
        return
    ok, why = skip_compatibility(config)
    if not ok:
        raise ConfigError(f"routing.skip_ratio: {config.routing.skip_ratio} needs middle stages that can be "
                          f"skipped, but {why}; set routing.skip_ratio = 0 or cut the model differently")
