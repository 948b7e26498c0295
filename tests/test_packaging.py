"""pyproject.toml lists packages explicitly (kernels/ is installed as baseq_kernels): the list must name
every package of the source tree."""

import pytest

tomllib = pytest.importorskip("tomllib")   # Python >= 3.11
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO / "src").parts) for p in (REPO / "src").rglob("__init__.py")}
    assert found | {"baseq_kernels"} == listed
    assert (REPO / "kernels" / "__init__.py").is_file()
