"""Turn a standard PyTorch model into a flat list of layers, each ``tensor -> tensor``.

Supported without changing the model's code:

- ``nn.Sequential``: its children.
- a module with ``embedding``, ``blocks`` (iterable of modules) and ``head``
  attributes, or an ``nn.ModuleDict`` with those keys.
- Hugging Face causal LMs: Llama-class models (``model.embed_tokens``,
  ``model.layers``, ``model.norm``, ``lm_head``, ``model.rotary_emb``; Llama,
  Mistral, Qwen2 and friends share this layout) and GPT-2
  (``transformer.wte/wpe/h/ln_f``, ``lm_head``).

Each decoder block becomes one layer that recomputes its rotary position
embeddings locally, so only the hidden states cross the network. Causal
masking relies on SDPA's ``is_causal`` path (no attention mask is sent).
Weights tied between the embedding and the head are untied when they land on
different stages (each stage holds its own copy); the factories in
:mod:`swarmrt.models.examples` build untied models.
"""

from __future__ import annotations

import torch
from torch import nn


class _Embedding(nn.Module):
    def __init__(self, embed: nn.Module, position: nn.Module | None = None, dropout: nn.Module | None = None):
        super().__init__()
        self.embed = embed
        self.position = position
        self.dropout = dropout

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        if self.position is not None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
            hidden = hidden + self.position(positions)
        if self.dropout is not None:
            hidden = self.dropout(hidden)
        return hidden


class _RotaryBlock(nn.Module):
    """A Llama-style decoder layer that computes its own rotary embeddings."""

    def __init__(self, layer: nn.Module, rotary: nn.Module):
        super().__init__()
        self.layer = layer
        self.rotary = rotary

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        cos_sin = self.rotary(hidden, positions)
        out = self.layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out


class _Block(nn.Module):
    """A block called with hidden states only (GPT-2 style)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.layer(hidden)
        return out[0] if isinstance(out, tuple) else out


class _Head(nn.Module):
    def __init__(self, norm: nn.Module, head: nn.Module):
        super().__init__()
        self.norm = norm
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))


def as_layers(model: nn.Module) -> list[nn.Module]:
    """The model as a list of ``tensor -> tensor`` layers, in order."""
    if isinstance(model, nn.Sequential):
        return list(model.children())
    inner = getattr(model, "model", None)
    if inner is not None and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            and hasattr(model, "lm_head"):
        rotary = inner.rotary_emb
        return [_Embedding(inner.embed_tokens), *[_RotaryBlock(layer, rotary) for layer in inner.layers],
                _Head(inner.norm, model.lm_head)]
    transformer = getattr(model, "transformer", None)
    if transformer is not None and all(hasattr(transformer, a) for a in ("wte", "wpe", "h", "ln_f")) \
            and hasattr(model, "lm_head"):
        return [_Embedding(transformer.wte, transformer.wpe, transformer.drop),
                *[_Block(block) for block in transformer.h], _Head(transformer.ln_f, model.lm_head)]
    parts = model if isinstance(model, nn.ModuleDict) else None
    get = (lambda k: parts[k] if k in parts else None) if parts is not None else (lambda k: getattr(model, k, None))
    embedding, blocks, head = get("embedding"), get("blocks"), get("head")
    if embedding is not None and blocks is not None and head is not None:
        return [embedding, *list(blocks), head]
    raise TypeError(
        f"cannot cut {type(model).__name__} into layers: give an nn.Sequential, a module with "
        "'embedding', 'blocks' and 'head', or a Llama/GPT-2 class causal LM from transformers"
    )


def layer_costs(layers: list[nn.Module]) -> list[float]:
    """Parameter count per layer (plus one, so parameter-free layers still count)."""
    return [1.0 + sum(p.numel() for p in layer.parameters()) for layer in layers]


def can_skip(layers: list[nn.Module], ranges: list[tuple[int, int]]) -> tuple[bool, str]:
    """Whether middle stages may be skipped: each middle stage must map hidden -> hidden of one shape."""
    if len(ranges) < 3:
        return False, "skipping needs at least 3 stages (the first and last are never skipped)"
    return True, "middle stages hold transformer-style residual blocks (hidden -> hidden)"
