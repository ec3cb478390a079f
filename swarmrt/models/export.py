"""Merge a run's stage checkpoints back into the user's model and write it out.

``swarmrt export --config run.toml --checkpoints DIR --out HF_DIR``: the user's model is built as
the run builds it (factory or ``model.pretrained``), each stage's newest intact checkpoint under
``DIR`` is loaded into that stage's layers (the stage modules share the model's parameters, so
loading them fills the model), and the model is written with ``save_pretrained`` (a Hugging Face
model: ``AutoModelForCausalLM.from_pretrained(HF_DIR)`` loads it) or, for any other module, as
``HF_DIR/model.pt`` (``torch.save`` of its state dict). With local SGD the stage's own parameters
(the ones it served) are exported.
"""

from __future__ import annotations

import io
import pathlib

import torch

from swarmrt.checkpoint.store import CheckpointError, load_latest_checkpoint
from swarmrt.config import RunConfig
from swarmrt.models.build import materialized, partition_hash, stage_module


def export_model(config: RunConfig, checkpoints: str, out: str) -> dict:
    """Write the merged model to ``out``; returns what was written and from which checkpoints."""
    model, layers, ranges, tied, _ = materialized(config, None)
    partition = partition_hash(config, ranges)
    sources = []
    for stage in range(config.num_stages):
        found = load_latest_checkpoint(checkpoints, config.run.id, stage, partition)
        if found is None:
            raise CheckpointError(f"no checkpoint of stage {stage} of run {config.run.id!r} under {checkpoints}: "
                                  "every stage needs one to export the model")
        meta, state, path = found
        saved = torch.load(io.BytesIO(state), weights_only=True) if isinstance(state, bytes) else state
        module_state = saved.get("module") if isinstance(saved, dict) else None
        if module_state is None:
            raise CheckpointError(f"{path}: holds no stage module (not written by a stage peer)")
        try:
            stage_module(layers, ranges, tied, stage).load_state_dict(module_state)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: does not fit stage {stage} of this model: {e}") from None
        sources.append({"stage": stage, "step": meta.step, "path": str(path)})
    target = pathlib.Path(out)
    target.mkdir(parents=True, exist_ok=True)
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained(target)
        written = str(target)
    else:
        written = str(target / "model.pt")
        torch.save(model.state_dict(), written)
    return {"out": written, "stages": sources}
