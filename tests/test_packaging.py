"""The distribution installs only beneath the `dgdm` namespace, for wheel and editable installs.

PyPI has distributions that own top-level `kernels`, `agent` and `sync`; ours must never
shadow or be shadowed by them.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
    )
    (found,) = out.glob("dgdm_edge-*.whl")
    return found


def test_wheel_has_only_the_dgdm_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"dgdm"}
    assert "dgdm/__init__.py" not in names  # an implicit namespace package
    for package in ("agent", "sync", "kernels"):
        assert f"dgdm/{package}/__init__.py" in names
    for page in ("index.html", "login.html", "app.js", "page.css"):  # the fleet page
        assert f"dgdm/sync/coordinator/static/{page}" in names


def test_wheel_imports_without_the_source_tree(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import dgdm.agent, dgdm.sync.errors, dgdm.kernels.method, dgdm.common.fields;"
        "print(dgdm.agent.__file__)"
    )
    # -S: no site-packages, so neither the editable install nor PyPI's `kernels` can answer.
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, str(target)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    assert done.stdout.strip().startswith(str(target))


def test_editable_install_maps_the_folders() -> None:
    import dgdm.agent
    import dgdm.common
    import dgdm.kernels
    import dgdm.sync

    folders = ((dgdm.agent, "agent"), (dgdm.sync, "sync"), (dgdm.kernels, "kernels"))
    for module, folder in (*folders, (dgdm.common, "common")):
        assert Path(module.__file__).parent == ROOT / folder


def test_cli_entry_point_lists_every_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dgdm.agent", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("agent", "coordinator", "keys", "diffuse", "demo", "bench", "telemetry"):
        assert command in done.stdout
