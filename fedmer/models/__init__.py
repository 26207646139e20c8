"""FedMER networks: per-modality temporal encoders, fusion heads, auxiliary objectives, the builder."""

from fedmer.models.cross_modal import CoAttentionFusion, CrossModalTransformerFusion
from fedmer.models.encoders import ENCODERS, CRNNEncoder, GRUEncoder, TCNEncoder, build_encoder
from fedmer.models.fusion import FUSIONS, AttentionFusion, ConcatFusion, Fusion, LateFusion, build_fusion
from fedmer.models.gated import GatedFusion
from fedmer.models.multimodal import (
    ModelOutput,
    MultimodalEmotionNet,
    build_model,
    build_model_for,
    count_parameters,
)
from fedmer.models.objectives import (
    AUX_OBJECTIVES,
    AuxObjective,
    CCAAlignment,
    PrototypeContrastive,
    build_aux_objective,
)
from fedmer.models.text_encoder import build_text_encoder  # registers the "text" encoder

__all__ = [
    "AUX_OBJECTIVES",
    "ENCODERS",
    "FUSIONS",
    "AttentionFusion",
    "AuxObjective",
    "CCAAlignment",
    "CRNNEncoder",
    "CoAttentionFusion",
    "ConcatFusion",
    "CrossModalTransformerFusion",
    "Fusion",
    "GRUEncoder",
    "GatedFusion",
    "LateFusion",
    "ModelOutput",
    "MultimodalEmotionNet",
    "PrototypeContrastive",
    "TCNEncoder",
    "build_aux_objective",
    "build_encoder",
    "build_fusion",
    "build_model",
    "build_model_for",
    "build_text_encoder",
    "count_parameters",
]
