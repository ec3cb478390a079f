"""Build the model a run config names and cut it into stage modules."""

from __future__ import annotations

import hashlib
import importlib

import torch
from torch import nn

from swarmrt.config import ConfigError, RunConfig
from swarmrt.models.partition import balanced_ranges, validate_ranges
from swarmrt.models.layers import as_layers, can_skip, layer_costs


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


def build_layers(config: RunConfig) -> list[nn.Module]:
    """Call the factory with the run's seed (every peer gets the same init) and flatten it."""
    factory = resolve_factory(config.model.factory)
    torch.manual_seed(config.run.seed)
    try:
        model = factory(**dict(config.model.kwargs))
    except TypeError as e:
        raise ConfigError(f"model.kwargs: {config.model.factory} rejected them: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory: {config.model.factory} returned {type(model).__name__}, not an nn.Module")
    try:
        return as_layers(model)
    except TypeError as e:
        raise ConfigError(f"model.factory: {e}") from None


def stage_ranges(config: RunConfig, layers: list[nn.Module]) -> list[tuple[int, int]]:
    try:
        if config.model.layer_ranges is not None:
            return validate_ranges(config.model.layer_ranges, len(layers))
        return balanced_ranges(layer_costs(layers), config.model.stages)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def build_stage(config: RunConfig, stage: int) -> nn.Sequential:
    """The ``nn.Sequential`` of the layers that stage ``stage`` serves."""
    if not 0 <= stage < config.num_stages:
        raise ConfigError(f"stage {stage} does not exist: the run has stages 0..{config.num_stages - 1}")
    layers = build_layers(config)
    start, end = stage_ranges(config, layers)[stage]
    return nn.Sequential(*layers[start:end])


def partition_hash(config: RunConfig, ranges: list[tuple[int, int]] | None = None) -> str:
    """Short hash of what each stage holds (factory, kwargs, layer ranges): checkpoints check it.
    Pass ``ranges`` when they are already known, to avoid building the model again."""
    if ranges is None:
        ranges = stage_ranges(config, build_layers(config))
    text = repr((config.model.factory, sorted(dict(config.model.kwargs).items()), [tuple(r) for r in ranges]))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def skip_compatibility(config: RunConfig) -> tuple[bool, str]:
    """Whether the run's stages may be skipped (:func:`swarmrt.models.layers.can_skip`), and why (not).

    Builds the model on the meta device (shapes only: no memory, no compute);
    a model that cannot be built there is built for real.
    """
    from swarmrt.data import sample_input

    if config.num_stages < 3:
        return False, (f"skipping needs at least 3 stages (the first and last are never skipped), "
                       f"the model has {config.num_stages}")
    sample = sample_input(config.data)
    try:
        with torch.device("meta"):
            layers = build_layers(config)
            return can_skip(layers, stage_ranges(config, layers), sample.to("meta"))
    except ConfigError:
        raise
    except Exception:  # a factory or layer that does not run on meta: check on real tensors
        layers = build_layers(config)
        return can_skip(layers, stage_ranges(config, layers), sample)


def check_skip(config: RunConfig) -> None:
    """Raise a :class:`ConfigError` naming ``routing.skip_ratio`` when it is set but the model cannot skip."""
    if config.routing.skip_ratio <= 0:
        return
    ok, why = skip_compatibility(config)
    if not ok:
        raise ConfigError(f"routing.skip_ratio: {config.routing.skip_ratio} needs middle stages that can be "
                          f"skipped, but {why}; set routing.skip_ratio = 0 or cut the model differently")
