"""Registered topologies: what one is (`Topology`), the bounds on how many and how large
(`RegistryLimits`), and their files, `<cache_dir>/topologies/<key>.npz` plus `index.json`
(graph_id -> key), so that a restarted agent has them again. The engine keeps the in-memory
registry and decides; this module holds no state beyond a folder."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import scipy.sparse as sp

from dgdm.kernels.backends.base import Problem
from dgdm.kernels.graph import Graph, NodeId
from dgdm.kernels.method import parse_method
from dgdm.kernels.operator import problem_for

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class Topology:
    graph_id: str
    node_ids: tuple[NodeId, ...]
    adjacency: sp.csr_matrix
    directed: bool
    problem: Problem
    # F of the features it was registered with (None: none); OIP metadata shows it (§4.1).
    features: int | None = None

    @property
    def nbytes(self) -> int:
        """What it holds in memory (A and T in CSR, the node ids); its file is about half."""
        arrays = (self.adjacency, self.problem.t)
        csr = sum(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes for a in arrays)
        return int(csr) + len(json.dumps(list(self.node_ids)))

    def describe(self) -> dict[str, Any]:
        return {
            "graph_id": self.graph_id,
            "key": self.problem.key,
            "nodes": len(self.node_ids),
            "edges": int(self.adjacency.nnz),
            "directed": self.directed,
            "method": self.problem.method.to_json(),
            "features": self.features,
        }


@dataclass(frozen=True)
class RegistryLimits:
    """Bounds on registered topologies, named as the agent's config keys. None: unbounded."""

    max_topologies: int | None = None
    max_bytes: int | None = None

    def refusal(self, count: int, used_bytes: int, new_bytes: int) -> str | None:
        """Why one more topology of `new_bytes` beside `count` of `used_bytes` does not fit;
        the sentence starts with the key to raise. None when it fits."""
        if self.max_topologies is not None and count >= self.max_topologies:
            return (
                f"kernels.max_topologies ({self.max_topologies}) topologies are registered: "
                "delete one first"
            )
        if self.max_bytes is not None and used_bytes + new_bytes > self.max_bytes:
            return (
                f"kernels.max_topology_bytes ({self.max_bytes}) would be passed: this "
                f"topology needs {new_bytes} bytes and {used_bytes} are in use"
            )
        return None


def read_topology(path: Path) -> Topology:
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        n = len(meta["node_ids"])
        adjacency = sp.csr_matrix((npz["data"], npz["indices"], npz["indptr"]), shape=(n, n))
    method = parse_method(meta["method"])
    node_ids = tuple(meta["node_ids"])
    graph = Graph(node_ids, adjacency, np.zeros((n, 0)), bool(meta["directed"]), meta["graph_id"])
    features = meta.get("features")
    return Topology(
        meta["graph_id"],
        node_ids,
        adjacency,
        graph.directed,
        problem_for(graph, method),
        features if type(features) is int and features > 0 else None,
    )


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safe(key: str) -> str:
    return _SAFE_ID.sub("_", key)


class TopologyFiles:
    """The registry's folder: one `.npz` per topology key and the `index.json` naming them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, key: str) -> Path:
        return self.folder / f"{_safe(key)}.npz"

    def save(self, topology: Topology) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        a = topology.adjacency
        arrays = {
            "indptr": a.indptr,
            "indices": a.indices,
            "data": a.data,
            "meta": np.array(
                json.dumps(
                    {
                        "graph_id": topology.graph_id,
                        "node_ids": list(topology.node_ids),
                        "directed": topology.directed,
                        "method": topology.problem.method.to_json(),
                        "features": topology.features,
                    }
                )
            ),
        }
        path = self.folder / f"{topology.problem.key}.npz"
        _atomic_write(path, lambda f: np.savez(f, **arrays))

    def write_index(self, index: Mapping[str, str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(dict(index), sort_keys=True).encode()
        _atomic_write(self.folder / "index.json", lambda f: f.write(payload))

    def index_inode(self) -> int | None:
        """The index file's inode number, None when there is none."""
        try:
            return (self.folder / "index.json").stat().st_ino
        except OSError:
            return None

    def hold_index(self) -> tuple[dict[str, str], IO[bytes] | None]:
        """The index and its file, kept open: while it is held its inode number is not
        reused, so another number always means a newer index (each is a new file)."""
        try:
            f = (self.folder / "index.json").open("rb")
        except OSError:
            return {}, None
        try:
            index: dict[str, str] = json.loads(f.read())
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable topology index %s: %s", self.folder, exc)
            index = {}
        return index, f

    def read_index(self) -> dict[str, str]:
        """graph_id -> key; empty when there is none or it cannot be read (logged)."""
        path = self.folder / "index.json"
        if not path.exists():
            return {}
        try:
            index: dict[str, str] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable topology index %s: %s", self.folder, exc)
            return {}
        return index

    def remove(self, key: str) -> None:
        (self.folder / f"{key}.npz").unlink(missing_ok=True)
