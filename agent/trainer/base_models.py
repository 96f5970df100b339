"""A base model of either kind, the paper's MLP or a CNN, chosen by the `kind` in its file.

The agent, the load generator and the fleet tools load and fine-tune through here, so they
take either model unchanged: both kinds answer the same questions (n_inputs, n_classes,
layer_input_dims, weights_hash, logits, accuracy, bn1_pre_activations) and both fine-tune into
a Skip-LoRA `Adapter`. A file without a kind is an MLP (the format before CNNs).
"""

from __future__ import annotations

from pathlib import Path

from agent.trainer.cnn.finetune import finetune_cnn
from agent.trainer.cnn.model import MODEL_KIND as CNN_KIND
from agent.trainer.cnn.model import CnnModel
from agent.trainer.errors import ModelFileError
from agent.trainer.finetune import FinetuneResult
from agent.trainer.finetune import finetune as finetune_mlp
from agent.trainer.model import BaseModel
from agent.trainer.model_file import read_header

MLP_KIND = "mlp"


def model_kind(path: Path) -> str:
    """The kind a model file declares in its header ("mlp" when it declares none)."""
    kind = read_header(path).get("kind", MLP_KIND)
    if kind not in (MLP_KIND, CNN_KIND):
        raise ModelFileError(f"{path}: unknown model kind {kind!r} (expected mlp or cnn)")
    return kind


def load_base_model(path: str | Path) -> BaseModel | CnnModel:
    path = Path(path)
    return CnnModel.load(path) if model_kind(path) == CNN_KIND else BaseModel.load(path)


def finetune(model: BaseModel | CnnModel, X, y, **options) -> FinetuneResult:
    """What a device runs, for either kind: a Skip-LoRA-family fine-tune into an adapter."""
    run = finetune_cnn if isinstance(model, CnnModel) else finetune_mlp
    return run(model, X, y, **options)
