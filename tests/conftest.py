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


#: Real datasets whose on-disk feature cache several tests fill and read (names as in node ids).
CACHED_DATASETS = ("ravdess", "meld", "stress_predict")


def xdist_group_of(nodeid: str) -> str:
    """The group of tests that ``make test`` (pytest-xdist, ``--dist loadgroup``) runs on one
    worker, one after another:

    - ``e2e``: every e2e test that starts Ray (never two Ray clusters at once; some time a
      shutdown; they share the session's quick run);
    - ``e2e-deployment``: the secured federation of real SuperLink/SuperNode processes (no Ray,
      its own ports, keys and Flower home; mostly waiting on nodes), beside the Ray group;
    - ``e2e-frontier``: the frontier sweep, whose jobs run in process (``federation.runtime=
      inprocess``, no Ray), so it need not wait for the Ray group either;
    - ``data-<name>``: the tests that name a real dataset with a feature cache (a cold cache is
      then extracted once, not by both workers at once);
    - otherwise the test's module (its module-scoped fixtures are built once, as serially).
    """
    if nodeid.rfind("@") > nodeid.rfind("]"):  # xdist's own "@group" suffix, should it ever work
        nodeid = nodeid.rsplit("@", 1)[0]
    module = nodeid.split("::")[0]
    if module == "tests/e2e/test_deployment.py":
        return "e2e-deployment"
    if module == "tests/e2e/test_frontier.py":
        return "e2e-frontier"
    if module.startswith("tests/e2e/"):
        return "e2e"
    return next((f"data-{name}" for name in CACHED_DATASETS if name in nodeid), module)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without xdist it is never called
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadgroup`` with the groups of :func:`xdist_group_of`.

    xdist 3.8's own ``xdist_group`` marks do nothing under pytest 9.2 (it renames the items'
    ``_nodeid``, which pytest no longer reads), so the groups are decided here, from node ids,
    by the controller's scheduler: each group goes to one worker, whole, in collection order
    (not xdist's default of the groups with most tests first).
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid)

    config.option.loadscopereorder = False  # groups in collection order: the e2e groups, the longest, first
    return GroupScheduling(config, log)


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
