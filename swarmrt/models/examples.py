"""Small models built from configs with random init: no download, ever."""

from __future__ import annotations

from torch import nn


def tiny_llama(vocab_size: int = 256, hidden_size: int = 64, layers: int = 6, heads: int = 4,
               intermediate_size: int | None = None, max_positions: int = 512) -> nn.Module:
    """A Llama-class decoder-only transformer from ``transformers`` (byte-level vocab by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(vocab_size: int = 256, hidden_size: int = 64, layers: int = 4, heads: int = 4,
              max_positions: int = 512) -> nn.Module:
    """A GPT-2 model from ``transformers`` with untied embeddings (the head lives on another stage)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=layers,
        n_head=heads,
        n_positions=max_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


def mlp(features: int = 16, hidden: int = 64, targets: int = 1, depth: int = 4) -> nn.Module:
    """A plain ``nn.Sequential`` MLP for regression."""
    layers: list[nn.Module] = [nn.Linear(features, hidden), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(hidden, hidden), nn.Tanh()]
    layers.append(nn.Linear(hidden, targets))
    return nn.Sequential(*layers)
