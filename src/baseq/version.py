"""What a run's result depends on besides its configuration: the code that computes it and the data files
it reads. Both are content digests (SHA-256), so they are the same wherever the tree or the data lives.

Code: the digest of the files a run executes or composes its config from (the baseq package, conf/,
run.py and the Triton kernels in kernels/), by relative path and content. It is computed from the files
themselves rather than asked of git, because the GPU machines get a copy of the tree without .git, and
because two different uncommitted edits have the same "<commit>-dirty" but different digests.

Data: the digest of each file's content, cached under $BASEQ_CACHE/digests/ (default ~/.cache/baseq)
by (resolved path, size, modification time), so that a large file is read once, not once per job."""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# in the source tree: <repo>/src/baseq; conf/, run.py and kernels/ are at <repo>
REPO = PACKAGE_DIR.parents[1]


def code_files() -> list[Path]:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    for folder, pattern in (("conf", "*.yaml"), ("kernels", "*.py")):
        if (REPO / folder).is_dir():
            files += sorted((REPO / folder).rglob(pattern))
    if (REPO / "run.py").is_file():
        files.append(REPO / "run.py")
    return [f for f in files if "__pycache__" not in f.parts]


@lru_cache(maxsize=1)
def code_digest() -> str:
    """16 hex digits of SHA-256 over (relative path, content) of every code file."""
    digest = hashlib.sha256()
    for path in code_files():
        rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path.relative_to(PACKAGE_DIR)
        digest.update(f"{rel.as_posix()}\0".encode())
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def digest_cache_dir() -> Path:
    return Path(os.environ.get("BASEQ_CACHE", Path.home() / ".cache" / "baseq")) / "digests"


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content (hex), cached by (resolved path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = digest_cache_dir() / stamp
    try:
        return cached.read_text().strip()
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # temp file + rename: concurrent jobs may hash the same file
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(value)
        os.replace(tmp, cached)
    except OSError:   # a cache that cannot be written only costs hashing again
        pass
    return value
