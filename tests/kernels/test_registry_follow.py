"""`Engine.follow_registry`: a second engine on the same cache_dir (a serving process's)
takes up every register, PATCH and delete of the first as soon as it is answered, one
stat per call while nothing changed, and never serves what the agent would not."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgdm.kernels.backends.numpy_backend import NumpyBackend
from dgdm.kernels.engine import Engine
from dgdm.kernels.errors import UnknownTopology
from dgdm.kernels.graph import Graph, parse_graph_json
from dgdm.kernels.registry import RegistryLimits

from .conftest import FIXTURES


@pytest.fixture(scope="module")
def karate() -> Graph:
    return parse_graph_json((FIXTURES / "karate.json").read_bytes())


OPEN: list[Engine] = []


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()  # a follower holds its index file open


def engines(folder: Path, **kw: object) -> tuple[Engine, Engine]:
    agent = Engine(cache_dir=folder, backends=[NumpyBackend()])
    follower = Engine(cache_dir=folder, backends=[NumpyBackend()], **kw)  # type: ignore[arg-type]
    OPEN.extend((agent, follower))
    return agent, follower


def test_the_follower_sees_each_change_when_it_is_made(tmp_path: Path, karate) -> None:
    agent, follower = engines(tmp_path)
    follower.follow_registry()
    with pytest.raises(UnknownTopology):
        follower.topology("karate")
    agent.register(karate)
    follower.follow_registry()
    first = follower.topology("karate").problem.key
    assert first == agent.topology("karate").problem.key
    z = follower.diffuse_registered("karate", karate.x).embedding
    np.testing.assert_allclose(z, agent.diffuse_registered("karate", karate.x).embedding)
    agent.update_edges("karate", add=[(0, 5)])
    follower.follow_registry()
    assert follower.topology("karate").problem.key == agent.topology("karate").problem.key != first
    agent.unregister("karate")
    follower.follow_registry()
    with pytest.raises(UnknownTopology):
        follower.topology("karate")


def test_an_unchanged_index_is_not_read_again(tmp_path: Path, karate, monkeypatch) -> None:
    agent, follower = engines(tmp_path)
    agent.register(karate)
    follower.follow_registry()
    files = follower._files  # what a call reads is the point here
    assert files is not None
    reads: list[int] = []
    hold = files.hold_index
    monkeypatch.setattr(files, "hold_index", lambda: reads.append(1) or hold())
    for _ in range(50):
        follower.follow_registry()
    assert reads == []
    agent.register(dataclasses.replace(karate, graph_id="other"))
    follower.follow_registry()
    assert reads == [1]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["put", "patch", "delete"]), min_size=1, max_size=12))
def test_quick_changes_of_the_same_size_are_all_seen(tmp_path_factory, karate, steps) -> None:
    """Each index is a new file of about the same size, within one timestamp tick: the
    follower tells them apart by inode, which the file it holds keeps from reuse."""
    agent, follower = engines(tmp_path_factory.mktemp("follow"))
    edge = 1
    for step in steps:
        registered = "karate" in {t["graph_id"] for t in agent.topologies()}
        if step == "put" or not registered:
            agent.register(karate)
        elif step == "patch":
            edge = edge % 33 + 1
            agent.update_edges("karate", add=[(0, edge)])
        else:
            agent.unregister("karate")
        follower.follow_registry()
        assert {t["key"] for t in follower.topologies()} == {t["key"] for t in agent.topologies()}


def test_the_follower_keeps_within_the_registry_limits(tmp_path: Path, karate) -> None:
    agent, follower = engines(tmp_path, registry=RegistryLimits(max_topologies=1))
    agent.register(karate)
    agent.register(dataclasses.replace(karate, graph_id="second"))
    follower.follow_registry()
    assert len(follower.topologies()) == 1
