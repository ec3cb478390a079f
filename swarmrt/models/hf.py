"""Hugging Face model directories: build a model from one's ``config.json`` and read only the tensors
a stage needs from its safetensors shards (as Petals' servers load only their blocks).

Nothing is downloaded: ``model.pretrained`` names a local directory (``save_pretrained``'s output,
or a snapshot copied from the Hub) holding ``config.json`` and ``model.safetensors`` or
``model.safetensors.index.json`` with its shards.
"""

from __future__ import annotations

import json
import pathlib

import torch
from torch import nn

from swarmrt.config import ConfigError

INDEX = "model.safetensors.index.json"


def _directory(path: str) -> pathlib.Path:
    root = pathlib.Path(path)
    if not (root / "config.json").is_file():
        raise ConfigError(f"model.pretrained: {path} is not a Hugging Face model directory (no config.json)")
    return root


def pretrained_skeleton(path: str) -> nn.Module:
    """The causal LM that ``PATH/config.json`` describes, built in the current context (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = _directory(path)
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f"model.pretrained: cannot build a causal LM from {root / 'config.json'}: {e}") from None


def weight_files(path: str) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    root = _directory(path)
    if (root / INDEX).is_file():
        weight_map = json.loads((root / INDEX).read_text()).get("weight_map", {})
        return {name: root / file for name, file in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model.pretrained: {path} holds no *.safetensors file and no {INDEX}")
    where = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            where.update({name: file for name in f.keys()})
    return where


def _candidates(name: str, prefix: str) -> list[str]:
    """``name`` and its spelling without the base model's prefix (checkpoints of the bare model)."""
    out = [name]
    if prefix and name.startswith(prefix + "."):
        out.append(name[len(prefix) + 1:])
    return out


def load_pretrained(path: str, model: nn.Module, made: dict[int, nn.Parameter]) -> None:
    """Fill the parameters in ``made`` (the stage's, just given storage) from ``path``'s safetensors,
    opening each shard once and reading only the stage's tensors (``safe_open``). A tensor the
    directory does not hold, or holds with another shape, is a :class:`ConfigError` naming it."""
    from safetensors import safe_open

    wanted = {id(p): p for p in made.values()}
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in wanted:
            names.setdefault(id(param), []).append(name)
    where = weight_files(path)
    prefix = getattr(model, "base_model_prefix", "")
    plan: dict[pathlib.Path, list[tuple[str, nn.Parameter, str]]] = {}
    for pid, param in wanted.items():
        options = [c for name in names.get(pid, []) for c in _candidates(name, prefix)]
        found = next((c for c in options if c in where), None)
        if found is None:
            raise ConfigError(f"model.pretrained: {path} has no tensor {' or '.join(options) or '<unnamed>'}")
        plan.setdefault(where[found], []).append((found, param, names[pid][0]))
    with torch.no_grad():
        for file, items in plan.items():
            with safe_open(str(file), framework="pt") as f:
                for stored, param, name in items:
                    tensor = f.get_tensor(stored)
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise ConfigError(f"model.pretrained: {file.name}: {stored} has shape {list(tensor.shape)}, "
                                          f"the model's {name} has {list(param.shape)}")
                    param.copy_(tensor.to(param.dtype))
