"""The package list in pyproject.toml is complete (it is listed, since sdtrain.conf lives in conf/)."""

import pytest
from helpers import REPO

tomllib = pytest.importorskip("tomllib")


def test_every_package_folder_is_listed_in_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "sdtrain").rglob("__init__.py")}
    assert folders <= listed and listed - folders == {"sdtrain.conf"}
    assert project["tool"]["setuptools"]["package-dir"] == {"sdtrain.conf": "conf"}
