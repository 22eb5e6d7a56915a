"""Paddle's CPU matrix products on a current MKL instead of the 2019 one its wheel bundles.

Paddle's CPU kernels for ``matmul``, ``linear`` and the convolutions' GEMMs (forward and backward) call MKL's
``cblas_sgemm`` family through ``libmklml_intel.so``, which the ``paddlepaddle`` 3.3 wheel bundles: MKLML
2019.0.5 (build 20190808). That MKL predates Intel's code paths for AMD CPUs and for recent Intel ones. On a
2-core AMD EPYC (AVX-512) it ran a 2048x2048 fp32 product at 54 GFLOP/s, against 146 in PyTorch on the same
machine, and 147-184 with the current MKL (2026.2) loaded in its place (``benchmarks/gemm_speed.py``).

Paddle does not link that library: it loads it at the first BLAS call, from the folder its flag
``FLAGS_mklml_dir`` names (``paddle/phi/backends/dynload/dynamic_loader.cc``, ``GetMKLMLDsoHandle``; the
flag is read from the environment at import, or set with ``paddle.set_flags`` before the first call). So a
folder whose ``libmklml_intel.so`` is the current MKL's single dynamic library, ``libmkl_rt`` (PyPI package
``mkl``, Intel's own build), routes every one of those calls to the current MKL, which exports the same
functions (``cblas_*``, the VML ``vs*`` functions, ``MKL_Set_Num_Threads``). ``select_mkl`` makes that folder
(symbolic links in a folder of the environment's ``lib``, else of the user's cache) and sets the flag.

``MKL_THREADING_LAYER=GNU`` (unless the user set it): MKL runs its threads on GNU OpenMP (``libgomp``), which
Paddle has loaded already for its own kernels. (In Paddle's process ``libmkl_rt`` takes its GNU layer even when
asked for ``INTEL``; ``SEQUENTIAL`` gives one thread.) ``OMP_WAIT_POLICY=PASSIVE`` (unless set): a thread that has
finished its share of a parallel region sleeps instead of spinning for the next one. Paddle's process holds two
OpenMP runtimes (GNU's, and the Intel ``libiomp5`` its wheel bundles); with their threads spinning, the small
products of a step waited for a thread that another spinning thread kept off its core: with another process
keeping the 2 cores busy, a 64x32x32 product took up to 4.5 ms, and a tiny ViT's forward pass 170-420 ms
instead of 2.3 ms with the threads sleeping (9-26 ms on the bundled MKLML). The thread count is still the one
``util.threads`` decides: Paddle's ``set_num_threads`` calls ``MKL_Set_Num_Threads`` of whichever MKL is loaded.

``MKL_CBWR=AUTO,STRICT`` (unless set): MKL's conditional numerical reproducibility mode. Without it MKL may
take another code path for a differently aligned buffer, so the same product can differ in the last bit
between two calls. Once, in CI on the current MKL, two identical predictions differed in the 6th decimal
(``tests/e2e/test_serve.py``, ``tests/unit/test_explain.py``); it did not recur locally, not even with an
offset buffer. STRICT promises the same bits for the same inputs and thread count, whatever the alignment. It
cost no measurable speed here (2048x2048 product, tiny ViT).

The products' results are not bit-identical to the old MKL's (a different blocking sums in a different
order); they are as close to the exact product as before (``tests/unit/test_blas.py``).

``RETFOUND_MKL=bundled`` keeps Paddle's own MKLML, and a ``FLAGS_mklml_dir`` set by the user is left alone.
Without the ``mkl`` package (it is installed with the toolkit on x86-64 Linux) nothing changes.

Call ``select_mkl`` before Paddle's first BLAS call: the entry points call it beside ``math_threads()``,
before they import Paddle.
"""
from __future__ import annotations

import os
import sys
from typing import MutableMapping

OPT_OUT = "RETFOUND_MKL"  # "bundled": Paddle's own MKLML
FLAG = "FLAGS_mklml_dir"
PADDLE_NAME = "libmklml_intel.so"  # the file Paddle opens in FLAGS_mklml_dir


def current_mkl() -> tuple[str, str] | None:
    """``(path of libmkl_rt, version)`` of the installed ``mkl`` package, or ``None`` without one."""
    from importlib import metadata

    try:
        dist = metadata.distribution("mkl")
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        name = os.path.basename(str(f))
        if name.startswith("libmkl_rt.so"):
            path = os.path.realpath(str(dist.locate_file(f)))
            if os.path.isfile(path):
                return path, dist.version
    return None


def _link_folder(library: str, version: str) -> str | None:
    """A folder whose ``libmklml_intel.so`` links to ``library``, beside links to MKL's other libraries (which
    ``libmkl_rt`` opens from the folder it was opened from): in the environment's ``lib``, else in the user's
    cache; ``None`` when neither can be written."""
    source = os.path.dirname(library)
    wanted = {PADDLE_NAME: library}
    wanted.update({n: os.path.join(source, n) for n in os.listdir(source) if n.startswith("libmkl_")})
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for folder in (os.path.join(source, "paddle_mklml"), os.path.join(cache, "retfound_paddle", f"mklml-{version}")):
        try:
            os.makedirs(folder, exist_ok=True)
            for name, target in wanted.items():
                link = os.path.join(folder, name)
                if os.path.realpath(link) == os.path.realpath(target):
                    continue
                tmp = f"{link}.{os.getpid()}.tmp"
                if os.path.lexists(tmp):
                    os.remove(tmp)
                os.symlink(target, tmp)
                os.replace(tmp, link)  # atomic: a process starting beside this one sees the old link or the new
            return folder
        except OSError:
            continue
    return None


def select_mkl(environ: MutableMapping[str, str] | None = None) -> str:
    """Point Paddle at the current MKL (see the module docstring); returns what was decided, in words."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "").strip().lower() == "bundled":
        return f"Paddle's bundled MKLML ({OPT_OUT}=bundled)"
    if env.get(FLAG):
        return f"the MKL in {FLAG}={env[FLAG]} (set by the user)"
    found = current_mkl()
    if found is None:
        return "Paddle's bundled MKLML (the mkl package is not installed)"
    library, version = found
    folder = _link_folder(library, version)
    if folder is None:
        return f"Paddle's bundled MKLML (no writable folder for the link to MKL {version})"
    env[FLAG] = folder
    env.setdefault("MKL_THREADING_LAYER", "GNU")
    env.setdefault("MKL_CBWR", "AUTO,STRICT")  # the same bits for the same inputs, whatever their alignment
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when the OpenMP runtimes start: at Paddle's import
    if environ is None and "paddle" in sys.modules:  # imported already: the flag is read now, not at import
        import paddle

        paddle.set_flags({FLAG: folder})
    return f"MKL {version} ({library})"


def loaded_blas() -> list[str]:
    """The MKL libraries this process has loaded (from ``/proc/self/maps``; empty where that does not exist)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "libmkl" in line}
    except OSError:
        return []
    return sorted(os.path.realpath(p) for p in paths)
