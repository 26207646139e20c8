"""The union sweeper's job list: each grid's product, shared params, command-line precedence, select."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from hydra_plugins.fedmer_union_sweeper import union_jobs
from simulations.frontier import sweep_size

GRIDS = {
    "dp": {"privacy": "sample", "privacy.target_epsilon": "1,8"},
    "reference": {"privacy": "off"},
}


def _as_sets(jobs: list[list[str]]) -> list[frozenset[str]]:
    return [frozenset(j) for j in jobs]


def test_each_grid_is_its_own_product_and_params_are_shared() -> None:
    jobs = union_jobs(GRIDS, {"seed": "0,1"}, [])
    assert len(jobs) == 2 * 2 + 2
    assert frozenset({"seed=1", "privacy=sample", "privacy.target_epsilon=8"}) in _as_sets(jobs)
    assert frozenset({"seed=0", "privacy=off"}) in _as_sets(jobs)
    # the reference grid never crosses the epsilons of the dp grid
    assert not any(
        "privacy=off" in j and any(o.startswith("privacy.target_epsilon") for o in j) for j in jobs
    )


def test_the_command_line_wins_and_a_job_two_grids_make_runs_once() -> None:
    jobs = union_jobs(GRIDS, {"seed": "0,1"}, ["seed=5", "privacy=client"])
    # privacy=client replaces both grids' unit: dp gives 2 jobs, reference 1 more (no epsilon)
    assert _as_sets(jobs) == [
        frozenset({"seed=5", "privacy=client", "privacy.target_epsilon=1"}),
        frozenset({"seed=5", "privacy=client", "privacy.target_epsilon=8"}),
        frozenset({"seed=5", "privacy=client"}),
    ]
    twice = union_jobs({"a": {"seed": "0,1"}, "b": {"seed": "1,2"}}, None, [])
    assert sorted(j[0] for j in twice) == ["seed=0", "seed=1", "seed=2"]


def test_grid_values_override_shared_params() -> None:
    jobs = union_jobs({"a": {"seed": "7"}, "b": {"privacy": "off"}}, {"seed": "0"}, [])
    assert _as_sets(jobs) == [frozenset({"seed=7"}), frozenset({"seed=0", "privacy=off"})]


def test_select_runs_the_named_grids_and_refuses_unknown_names() -> None:
    assert _as_sets(union_jobs(GRIDS, None, [], select=["reference"])) == [frozenset({"privacy=off"})]
    with pytest.raises(ValueError, match=r"hydra.sweeper.select=\['nope'\].*dp, reference"):
        union_jobs(GRIDS, None, [], select=["nope"])
    with pytest.raises(ValueError, match="grids is empty"):
        union_jobs({}, None, [])


def test_the_frontier_callback_counts_the_union_sweeps_jobs() -> None:
    config = OmegaConf.create(
        {"hydra": {"sweeper": {"params": {"seed": "0,1,2"}, "grids": GRIDS, "select": None},
                   "overrides": {"task": ["data=driving"]}}}
    )  # fmt: skip
    assert sweep_size(config) == 3 * 3
    config.hydra.sweeper.select = ["dp"]
    assert sweep_size(config) == 3 * 2
