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
Weights tied between the embedding and the head stay tied: when they would land
on different stages, the head runs on stage 0 (:class:`TiedEnds`), so a
microbatch starts and ends on a stage-0 peer and the one weight gets both
gradients, as in the unsplit model (:func:`swarmrt.models.build.tied_ends`).
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


class TiedEnds(nn.Module):
    """Stage 0 of a model whose head shares weights with its first layers (tied embeddings): token
    ids run the stage's own layers (``body``), hidden states run the head. The worker counts a
    microbatch's samples once, on the token-id pass (:meth:`counts_samples`)."""

    def __init__(self, body: nn.Sequential, head: nn.Module):
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) if x.is_floating_point() else self.body(x)

    def __len__(self) -> int:
        return len(self.body) + 1

    def counts_samples(self, x: torch.Tensor) -> bool:
        """Whether a backward with input ``x`` counts its samples (the head's pass of a microbatch does not)."""
        return not x.is_floating_point()


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


def _spec(x: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
    return x.dtype, tuple(x.shape[1:])


def _show(spec: tuple[torch.dtype, tuple[int, ...]], text: bool) -> str:
    """``float32 [B, T, 64]``: the sequence length of a text sample is shown as T."""
    dtype, shape = spec
    dims = ["B"] + (["T"] if text and shape else []) + list(map(str, shape[1:] if text else shape))
    return f"{str(dtype).removeprefix('torch.')} [{', '.join(dims)}]"


def stage_io(layers: list[nn.Module], ranges: list[tuple[int, int]],
             sample: torch.Tensor) -> list[tuple[tuple[torch.dtype, tuple[int, ...]], tuple[torch.dtype, tuple[int, ...]]]]:
    """``(input spec, output spec)`` of every stage for ``sample``: dtype and shape after the batch dimension.

    Runs ``sample`` through all layers once, without gradients (on the meta
    device too, when the layers and the sample live there).
    """
    io = []
    x = sample
    with torch.no_grad():
        for start, end in ranges:
            before = _spec(x)
            for layer in layers[start:end]:
                x = layer(x)
            io.append((before, _spec(x)))
    return io


def can_skip(layers: list[nn.Module], ranges: list[tuple[int, int]], sample: torch.Tensor) -> tuple[bool, str]:
    """Whether a microbatch may skip middle stages, and why (not).

    A middle stage (any stage but the first and the last) may be skipped when
    every middle stage takes exactly what stage 0 puts out and puts out what
    it takes (same dtype and shape, e.g. a transformer's hidden states through
    residual blocks). Then any increasing subset of stages composes: a stage
    accepts the output of any earlier one.
    """
    if len(ranges) < 3:
        return False, f"skipping needs at least 3 stages (the first and last are never skipped), the model has {len(ranges)}"
    io = stage_io(layers, ranges, sample)
    text = sample.dtype == torch.long  # token ids [B, T]: the second dimension is the sequence

    def show(spec):
        return _show(spec, text)

    hidden = io[0][1]
    for stage in range(1, len(ranges) - 1):
        (start, end), (takes, gives) = ranges[stage], io[stage]
        where = f"stage {stage} (layers {start}..{end - 1})"
        if takes != hidden:
            return False, (f"{where} takes {show(takes)} but stage 0 puts out {show(hidden)}: "
                           f"a microbatch that skipped the stages before it would not fit")
        if gives != takes:
            return False, (f"{where} maps {show(takes)} -> {show(gives)}: a microbatch that skipped it "
                           f"would reach the next stage with the wrong shape")
    return True, f"every middle stage maps {show(hidden)} -> {show(hidden)} (stage 0's output), so any may be skipped"
