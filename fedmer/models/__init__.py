"""FedMER networks: per-modality temporal encoders, fusion heads, and the model builder."""

from fedmer.models.encoders import ENCODERS, GRUEncoder, TCNEncoder, build_encoder
from fedmer.models.fusion import FUSIONS, AttentionFusion, ConcatFusion, Fusion, LateFusion, build_fusion
from fedmer.models.multimodal import MultimodalEmotionNet, build_model, count_parameters

__all__ = [
    "ENCODERS",
    "FUSIONS",
    "AttentionFusion",
    "ConcatFusion",
    "Fusion",
    "GRUEncoder",
    "LateFusion",
    "MultimodalEmotionNet",
    "TCNEncoder",
    "build_encoder",
    "build_fusion",
    "build_model",
    "count_parameters",
]
