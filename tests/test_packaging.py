"""Packaging: pyproject.toml lists every package, and the Triton kernels (kernels/baseq_kernels/, installed as
baseq_kernels) never shadow the unrelated PyPI package `kernels` that transformers probes for.

transformers (utils/import_utils.py, `_is_package_available("kernels")`) calls importlib.util.find_spec and,
without a `kernels` distribution, imports the module it found. Run from the checkout, the repo root is on
sys.path (the script's folder for `python run.py`, the cwd for `python -c` / `-m`, pytest's pythonpath), so a
regular package `kernels/` there would be imported instead of (or in place of) the real one; ours imports
triton, and without triton `from transformers import AttentionInterface` failed. kernels/ is therefore a
plain folder (a namespace portion: ignored next to a real `kernels`, reported absent by transformers).
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")   # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]

# Makes `import triton` fail as it does on a machine where it is not installed (put first on PYTHONPATH).
TRITON_BLOCKER = '''
import sys
class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _NoTriton())
'''

# A stand-in for the real PyPI `kernels` (the version transformers accepts, the names its hub integration
# imports), with the dist-info that importlib.metadata reads.
FAKE_KERNELS_VERSION = "0.18.2"
FAKE_KERNELS_NAMES = ["CUDAProperties", "Device", "KernelizeFallback", "LayerRepository", "LocalLayerRepository",
                      "Mode", "ROCMProperties", "register_kernel_mapping", "replace_kernel_forward_from_hub",
                      "use_kernel_mapping", "get_kernel", "kernelize", "use_kernel_forward_from_hub",
                      "use_kernelized_func"]


def test_every_package_is_listed_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(REPO / "src").parts) for p in (REPO / "src").rglob("__init__.py")}
    assert found | {"baseq_kernels"} == set(setuptools["packages"])
    assert setuptools["package-dir"]["baseq_kernels"] == "kernels/baseq_kernels"
    assert (REPO / "kernels" / "baseq_kernels" / "__init__.py").is_file()


def test_kernels_folder_is_not_a_regular_package():
    assert not (REPO / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder importable as the PyPI package `kernels` from the checkout")
    assert not list((REPO / "kernels").glob("*.py")), "modules belong in kernels/baseq_kernels/"


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    """The checkout built as a wheel (from a copy, so no build/ lands in the tree) and unpacked: an install."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src_copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("src", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          str(src), "-w", str(root / "dist")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    [wheel] = (root / "dist").glob("*.whl")
    site = root / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def test_wheel_installs_baseq_kernels_and_no_top_level_kernels(built_wheel):
    assert (built_wheel / "baseq_kernels" / "__init__.py").is_file()
    assert (built_wheel / "baseq_kernels" / "gemm.py").is_file()
    assert not (built_wheel / "kernels").exists()


def fake_real_kernels(root: Path) -> Path:
    pkg = root / "kernels"
    pkg.mkdir(parents=True)
    body = [f'__version__ = "{FAKE_KERNELS_VERSION}"', "class _Stub:", "    def __init__(self, *a, **k): pass",
            "def _decorator_factory(*a, **k):", "    return lambda obj: obj"]
    body += [f"{name} = _Stub" if name[0].isupper() else f"{name} = _decorator_factory" for name in FAKE_KERNELS_NAMES]
    (pkg / "__init__.py").write_text("\n".join(body) + "\n")
    info = root / f"kernels-{FAKE_KERNELS_VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {FAKE_KERNELS_VERSION}\n")
    (info / "top_level.txt").write_text("kernels\n")
    return root


# Run with the checkout's root as the cwd and first on sys.path (python -c puts the cwd there), triton blocked.
PROBE = '''
import importlib.util, sys
assert sys.path[0] == "", sys.path[:3]
from transformers import AttentionInterface
import baseq.modules
from transformers.utils.import_utils import is_kernels_available
spec = importlib.util.find_spec("kernels")
print("kernels_available", is_kernels_available())
print("kernels_origin", spec.origin if spec else None)
print("baseq_kernels_origin", importlib.util.find_spec("baseq_kernels").origin)
'''


def probe_from_checkout(tmp_path: Path, paths: list[Path], with_real_kernels: bool) -> dict[str, str]:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(TRITON_BLOCKER)
    extra = [fake_real_kernels(tmp_path / "real")] if with_real_kernels else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [blocker, *paths, *extra]))}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)


@pytest.mark.parametrize("with_real_kernels", [False, True], ids=["no_kernels_pkg", "real_kernels_pkg"])
def test_installed_wheel_imports_from_checkout_without_triton(built_wheel, tmp_path, with_real_kernels):
    seen = probe_from_checkout(tmp_path, [built_wheel], with_real_kernels)
    assert Path(seen["baseq_kernels_origin"]) == built_wheel / "baseq_kernels" / "__init__.py"
    if with_real_kernels:   # found, not shadowed by the checkout's kernels/ folder
        assert seen["kernels_available"] == "True"
        assert Path(seen["kernels_origin"]) == tmp_path / "real" / "kernels" / "__init__.py"
    else:                   # the checkout's folder is a namespace portion, which transformers reports as absent
        assert seen["kernels_available"] == "False"


def test_checkout_paths_resolve_to_the_repo_kernels_next_to_real_kernels(tmp_path):
    """pytest's pythonpath (src, kernels, .) with the real package installed."""
    seen = probe_from_checkout(tmp_path, [REPO / "src", REPO / "kernels"], with_real_kernels=True)
    assert Path(seen["baseq_kernels_origin"]) == REPO / "kernels" / "baseq_kernels" / "__init__.py"
    assert Path(seen["kernels_origin"]) == tmp_path / "real" / "kernels" / "__init__.py"


def test_run_py_from_checkout_without_triton(tiny_model_dirs, tiny_data_root, tmp_path):
    """`python run.py` (script folder = repo root first on sys.path) gets through a whole fp run."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(TRITON_BLOCKER)
    env = {**os.environ, "HYDRA_FULL_ERROR": "1",
           "PYTHONPATH": os.pathsep.join(map(str, [blocker, REPO / "src", REPO / "kernels"]))}
    args = ["model=local", f"model.path={tiny_model_dirs['llama']}", f"data_root={tiny_data_root}",
            f"results_dir={tmp_path / 'results'}", "device=cpu", "method=fp", "compare_with=[]",
            "eval.ppl.seqlen=32", "eval.ppl.max_windows=1", f"hydra.run.dir={tmp_path / 'hydra'}"]
    out = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wikitext2 ppl" in out.stdout
