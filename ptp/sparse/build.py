"""Build the C++ kernels on first use: g++ -> a shared library in a cache directory, keyed by
a hash of the sources, the compiler and the flags, loaded with ctypes.

No pip build step (which would pull a second torch into an isolated build environment) and no
torch headers: the library has a plain C ABI and takes raw pointers. Every ISA variant is
compiled with its own flags into one library, and the CPU is asked at run time which may run
(``__builtin_cpu_supports``), so the library is portable between machines of one architecture.
A variant the compiler cannot build is left out (``-DPTP_NO_AVX512``) rather than failing.

Cache: ``$PTP_SPARSE_CACHE``, else ``$XDG_CACHE_HOME/ptp/sparse``, else ``~/.cache/ptp/sparse``.
Compiler: ``$CXX``, else ``g++``, else ``c++``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("ptp.sparse")

CSRC = Path(__file__).with_name("csrc")
COMMON = ["-O3", "-std=c++17", "-fPIC", "-fno-math-errno"]
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vbmi2", "-mfma", "-mf16c"]
# (source, flags, macro that leaves the variant out when it cannot be compiled)
UNITS = [
    ("scalar.cpp", [], None),
    ("avx2.cpp", ["-mavx2", "-mfma", "-mf16c"], "PTP_NO_AVX2"),
    ("avx512.cpp", AVX512, "PTP_NO_AVX512"),
    ("amx.cpp", [*AVX512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16"], "PTP_NO_AMX"),
]


class BuildError(RuntimeError):
    """No compiler, or the required units failed to compile or link."""


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    if os.environ.get("PTP_SPARSE_CACHE"):
        return Path(os.environ["PTP_SPARSE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ptp" / "sparse"


def library_path() -> Path:
    """Build (if not cached) and return the path of the shared library. Raises BuildError."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX, or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    digest = hashlib.sha256(repr((version, COMMON, UNITS)).encode())
    for src in sorted(CSRC.glob("*")):
        digest.update(src.name.encode() + src.read_bytes())
    target = cache_dir() / digest.hexdigest()[:16] / "libptp_sparse.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects, left_out = [], []
        for source, flags, macro in UNITS:
            obj = Path(tmp) / (source + ".o")
            err = _run([cxx, *COMMON, *flags, "-c", str(CSRC / source), "-o", str(obj)])
            if err and macro is None:
                raise BuildError(f"compiling {source} failed: {err}")
            if err:
                log.warning("sparse runtime: %s left out (%s does not compile it): %s", source, cxx, err)
                left_out.append(f"-D{macro}")
                continue
            objects.append(str(obj))
        runtime, lib = Path(tmp) / "runtime.o", Path(tmp) / "lib.so"
        for threading in (["-fopenmp"], []):  # OpenMP: torch's thread pool (see runtime.cpp)
            err = _run([cxx, *COMMON, *threading, *left_out, "-c", str(CSRC / "runtime.cpp"), "-o", str(runtime)])
            err = err or _run([cxx, "-shared", "-o", str(lib), *objects, str(runtime), *threading])
            if not err:
                break
            if threading:
                log.warning("sparse runtime: %s cannot build with OpenMP (%s); the kernels will run on one thread",
                            cxx, err)
        if err:
            raise BuildError(f"building the sparse runtime failed: {err}")
        os.replace(lib, target)  # atomic: a concurrent build wins or loses whole
    log.info("sparse runtime: built %s", target)
    return target


def _run(cmd: list[str]) -> str | None:
    """None on success, else the compiler's last error line."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.splitlines() or ["?"]
    return lines[0].strip()


def main() -> None:
    """`make setup` pre-builds the library (a function, not ``python -m``: the package imports
    this module first, and runpy warns about that)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(library_path())
