"""Local text, tokenized: ``.txt`` and ``.jsonl`` files read from disk and tokenized with a tokenizer
from a local directory (its ``tokenizer.json``, as ``save_pretrained`` or the ``tokenizers`` library
write it). Nothing is downloaded. Documents are joined end to end, each followed by the tokenizer's
end-of-text token when ``tokenizer_config.json`` names one that is in the vocabulary.
"""

from __future__ import annotations

import functools
import json
import pathlib

import torch

from swarmrt.config import ConfigError

SUFFIXES = (".txt", ".jsonl")


def _files(path: str) -> list[pathlib.Path]:
    root = pathlib.Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(f for f in root.rglob("*") if f.suffix in SUFFIXES and f.is_file())
    else:
        raise ConfigError(f"data.path: not found: {path}")
    for file in files:
        if file.suffix not in SUFFIXES:
            raise ConfigError(f"data.path: {file.name}: can read {', '.join(SUFFIXES)} files, not {file.suffix!r} "
                              "(convert it to jsonl, or give a data.factory)")
    if not files:
        raise ConfigError(f"data.path: {path} holds no {' or '.join(SUFFIXES)} file")
    return files


def documents(path: str, text_field: str, max_bytes: int):
    """The texts of the files under ``path``, in a fixed order, up to about ``max_bytes`` of text."""
    total = 0
    for file in _files(path):
        if file.suffix == ".txt":
            texts = [file.read_text(errors="replace")]
        else:
            texts = []
            for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"data.path: {file.name} line {number}: not JSON: {e}") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ConfigError(f"data.text_field: {file.name} line {number} has no string field "
                                      f"{text_field!r}")
                texts.append(record[text_field])
        for text in texts:
            yield text
            total += len(text)
            if total >= max_bytes:
                return


def _tokenizer(directory: str):
    from tokenizers import Tokenizer

    file = pathlib.Path(directory) / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"data.tokenizer: {directory} has no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(file))
    eos = None
    config = pathlib.Path(directory) / "tokenizer_config.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("eos_token")
        name = name.get("content") if isinstance(name, dict) else name
        eos = tokenizer.token_to_id(name) if isinstance(name, str) else None
    return tokenizer, eos


@functools.lru_cache(maxsize=4)
def load_tokens(path: str, tokenizer_dir: str, text_field: str, max_bytes: int) -> torch.Tensor:
    """The corpus under ``path`` as one 1-D tensor of token ids (int64)."""
    tokenizer, eos = _tokenizer(tokenizer_dir)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(list(documents(path, text_field, max_bytes))):
        ids.extend(encoding.ids)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)
