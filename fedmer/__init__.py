"""FedMER: federated, differentially private, multimodal emotion recognition."""

from fedmer.config import ConfigError, ExperimentConfig

__all__ = ["ConfigError", "ExperimentConfig", "__version__"]
__version__ = "0.1.0"
