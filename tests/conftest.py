"""Shared fixtures: paths, and the Hydra composition helper used by config tests."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType

import pytest
from flwr.serverapp import Grid
from hypothesis import settings

# Property tests draw the same examples on every run (CI included), so a red build is
# reproducible rather than a dice roll; FEDMER_HYPOTHESIS=explore draws fresh ones.
settings.register_profile("reproducible", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile("explore" if os.environ.get("FEDMER_HYPOTHESIS") == "explore" else "reproducible")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED_DATA = ROOT.parent / "shared" / "data"


def _stop_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"pytest received signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM'd test run (CI cancelling, a timeout, `kill`) unwinds like Ctrl-C: the tests'
    ``finally`` blocks and fixture teardowns then stop the SuperLinks, SuperNodes and Ray
    processes they started, instead of leaving them running."""
    signal.signal(signal.SIGTERM, _stop_as_interrupt)


@pytest.fixture(autouse=True)
def _one_thread():
    """Keep torch to one thread in tests: faster and deterministic on 2 cores."""
    import torch

    torch.set_num_threads(1)
    yield


def compose(overrides: list[str] | None = None, output_dir: str = "outputs/flwr/{run_id}"):  # type: ignore[no-untyped-def]
    """Compose configs/config.yaml with overrides, as `python -m simulations.run` would."""
    from simulations.compose import compose_config

    return compose_config(overrides, output_dir)


class NodeListGrid(Grid):
    """Only what a strategy's configure_train touches: the list of connected nodes."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def dp_sgd_setup(model, tensors, batch_size: int):  # type: ignore[no-untyped-def]
    """Opacus ``make_private`` over ``tensors`` (noise 1, clip 1, Poisson sampling), seeded.

    Returns ``(private module, DP optimizer, DP loader)``; the secure-RNG advice is silenced.
    """
    import warnings

    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(*tensors), batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
        )


#: A three-modality toy layout shared by the tests of masking, missing modalities and statistics.
TOY_MODALITIES = ("speech", "face", "physio")
TOY_SLICES = ((0, 3), (3, 5), (5, 9))


def toy_dataset(x, mask, classes: int = 4):  # type: ignore[no-untyped-def]
    """``x`` (N, T, 9) in the toy layout, labels ``i % classes``, 4 samples a person, masked."""
    import numpy as np

    from fedmer.data.base import MultimodalDataset

    n = len(x)
    data = MultimodalDataset(
        x=np.asarray(x, dtype=np.float32),
        mask=np.ones((n, 3), bool),
        y=np.arange(n) % classes,
        person=np.arange(n) // 4,
        site=np.zeros(n, np.int64),
        modalities=TOY_MODALITIES,
        feature_slices=TOY_SLICES,
        class_names=tuple("abcdefgh"[:classes]),
    )
    return data.with_mask(np.asarray(mask, dtype=bool))
