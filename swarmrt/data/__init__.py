"""Training data that is present offline on every machine.

``text``: byte-level language modelling (vocabulary 256) on a text file, or by
default on the Python standard library's own source files, which every Python
install carries: real, varied text, no download. With ``data.tokenizer``, the
``.txt``/``.jsonl`` files at ``data.path`` are tokenized with a local tokenizer
instead (:mod:`swarmrt.data.tokenized`). ``regression``: a seeded random
linear-plus-tanh teacher, for ``nn.Sequential`` examples. ``data.factory``:
the user's own batch source; ``data.loss``: the user's own loss.

Batches are a pure function of ``(seed, stream, step)``, so a trainer's data
position is just its step counter (resume = start at that step).
"""

from __future__ import annotations

import functools
import pathlib
import sysconfig

import torch

from swarmrt.config import ConfigError, DataSection
from swarmrt.imports import resolve


@functools.lru_cache(maxsize=4)
def load_text(path: str | None, max_bytes: int) -> torch.Tensor:
    """The corpus as a uint8 tensor of bytes."""
    if path is not None:
        file = pathlib.Path(path)
        if not file.is_file():
            raise ConfigError(f"data.path: file not found: {path}")
        raw = file.read_bytes()[:max_bytes]
    else:
        stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
        chunks, total = [], 0
        for file in sorted(stdlib.glob("*.py")):
            data = file.read_bytes()
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                break
        raw = b"".join(chunks)[:max_bytes]
    if len(raw) < 1024:
        raise ConfigError(f"data: the corpus has only {len(raw)} bytes; need at least 1024")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


class Batches:
    """Deterministic batches: ``batch(step)`` -> ``(inputs, targets)``.

    ``stream`` separates trainers of one run (each gets its own sample order).
    The last 5% of the text is held out for :meth:`eval_batch`.
    """

    def __init__(self, data: DataSection, seed: int, stream: int = 0):
        self.data = data
        self.seed = seed
        self.stream = stream
        self.source = None
        if data.factory is not None:  # the user's source: batch(step), eval_batch(n, index)
            self.source = resolve(data.factory, "data.factory")(data, seed, stream, **dict(data.factory_kwargs))
            if not callable(getattr(self.source, "batch", None)):
                raise ConfigError(f"data.factory: {data.factory} returned {type(self.source).__name__}, which has "
                                  "no batch(step) method")
        elif data.kind == "text":
            if data.tokenizer is not None:
                from swarmrt.data.tokenized import load_tokens

                corpus = load_tokens(data.path, data.tokenizer, data.text_field, data.max_bytes)
            else:
                corpus = load_text(data.path, data.max_bytes)
            split = int(len(corpus) * 0.95)
            self.train, self.held_out = corpus[:split], corpus[split:]
            if len(self.held_out) <= data.seq_len + 1:
                unit = "tokens" if data.tokenizer is not None else "bytes"
                raise ConfigError(f"data.seq_len: {data.seq_len} is too long for a corpus of {len(corpus)} {unit}")
        else:
            g = torch.Generator().manual_seed(seed + 7919)
            self.teacher = torch.randn(data.features, data.targets, generator=g) / data.features ** 0.5

    def _generator(self, step: int, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, self.stream, step, salt)) & 0x7FFF_FFFF_FFFF_FFFF)

    def _text(self, corpus: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.data.seq_len
        starts = torch.randint(0, len(corpus) - L - 1, (n,), generator=g)
        windows = torch.stack([corpus[s:s + L + 1] for s in starts.tolist()]).long()
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is not None:
            return self._checked(self.source.batch(step), f"batch({step})")
        g = self._generator(step)
        n = self.data.batch_size
        if self.data.kind == "text":
            return self._text(self.train, n, g)
        x = torch.randn(n, self.data.features, generator=g)
        return x, torch.tanh(x @ self.teacher)

    def eval_batch(self, n: int = 64, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out batch number ``index`` (a pure function of the seed and ``index``; streams share it)."""
        if self.source is not None:
            if not callable(getattr(self.source, "eval_batch", None)):
                raise ConfigError(f"data.factory: {self.data.factory}'s source has no eval_batch(n, index): "
                                  "it cannot be evaluated")
            return self._checked(self.source.eval_batch(n, index), f"eval_batch({n}, {index})")
        g = self._generator(-1 - index, salt=1)
        if self.data.kind == "text":
            return self._text(self.held_out, n, g)
        x = torch.randn(n, self.data.features, generator=g)
        return x, torch.tanh(x @ self.teacher)


    def _checked(self, batch, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch from the user's source, checked against ``data``: a clear error instead of a bad step."""
        where = f"data.factory: {self.data.factory} {what}"
        if not (isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
            raise ConfigError(f"{where} must return (inputs, targets) tensors, got {type(batch).__name__}")
        x, y = batch
        sample = sample_input(self.data)
        if x.dtype != sample.dtype or x.dim() != sample.dim() or len(y) != len(x) \
                or (self.data.kind == "text" and x.shape[1:] != (self.data.seq_len,)):
            raise ConfigError(f"{where} gave inputs {x.dtype} {list(x.shape)} and targets {list(y.shape)}; "
                              f"data.kind = {self.data.kind!r} wants {sample.dtype} inputs like "
                              f"[B, {self.data.seq_len if self.data.kind == 'text' else self.data.features}] "
                              "and one target row per sample")
        return x, y


def sample_input(data: DataSection) -> torch.Tensor:
    """A one-sample input of the right dtype and shape (used to infer stage input specs)."""
    if data.kind == "text":
        return torch.zeros(1, min(data.seq_len, 8), dtype=torch.long)
    return torch.zeros(1, data.features)


def loss_sum(data: DataSection, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over samples of each sample's mean loss (cross-entropy per token, or MSE; or ``data.loss``)."""
    if data.loss is not None:
        per_sample = resolve(data.loss, "data.loss")(output, targets)
        if not isinstance(per_sample, torch.Tensor) or tuple(per_sample.shape) != (output.shape[0],):
            shape = list(per_sample.shape) if isinstance(per_sample, torch.Tensor) else type(per_sample).__name__
            raise ConfigError(f"data.loss: {data.loss} must return one loss per sample (shape "
                              f"[{output.shape[0]}]), got {shape}")
        return per_sample.float().sum()
    if data.kind == "text":
        per_token = torch.nn.functional.cross_entropy(
            output.reshape(-1, output.shape[-1]).float(), targets.reshape(-1), reduction="none")
        return per_token.view(targets.shape).mean(dim=1).sum()
    return ((output.float() - targets) ** 2).mean(dim=tuple(range(1, output.dim()))).sum()
