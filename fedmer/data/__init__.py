"""Datasets for FedMER: the packed multimodal format, the synthetic generator,
client partitioning and the name -> loader registry."""

from fedmer.data.base import DatasetSplit, MultimodalDataset
from fedmer.data.meld import load_meld  # registers "meld"
from fedmer.data.partition import drop_modalities, partition_clients, partition_indices
from fedmer.data.ravdess import load_ravdess  # registers "ravdess"
from fedmer.data.registry import (
    DatasetLoader,
    available_datasets,
    clear_data_cache,
    load_client_dataset,
    load_split,
    register_dataset,
)
from fedmer.data.stress_predict import load_stress_predict  # registers "stress_predict"
from fedmer.data.synthetic import generate_synthetic, scenario_class_names

__all__ = [
    "DatasetLoader",
    "DatasetSplit",
    "MultimodalDataset",
    "available_datasets",
    "clear_data_cache",
    "drop_modalities",
    "generate_synthetic",
    "load_client_dataset",
    "load_meld",
    "load_ravdess",
    "load_split",
    "load_stress_predict",
    "partition_clients",
    "partition_indices",
    "register_dataset",
    "scenario_class_names",
]
