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

Freed memory kept for reuse (``keep_freed_memory``, called by ``select_mkl``; ``RETFOUND_MALLOC=system`` opts
out). Paddle's CPU allocator takes every tensor from ``malloc``. glibc serves a block above its mmap threshold
(128 KiB at first, raised dynamically) with fresh pages from the kernel and returns them at ``free``, and it
trims the heap's top on every large free. So an operator whose output is a few MB (a ViT-B/16 MLP activation,
batch 4: 9.7 MB) page-faults and zero-fills its output on every call: on a 2-core AMD EPYC an element-wise add of
two [4, 197, 3072] tensors took 4.4 ms, 0.6 ms with the settings below, and exact GELU forward + backward
54.7 ms against 13.7 ms (``benchmarks/elementwise_speed.py``). ``mallopt`` fixes the mmap threshold at 32 MiB
(glibc's maximum) and the trim threshold at 512 MiB, so freed blocks stay in the heap for the next operator;
larger blocks are still mapped and unmapped. The values computed do not change, only where they live; the peak
resident memory of a ViT-B step rose by about 40 MB (2.66 -> 2.70 GB). Outside glibc nothing changes.

Call ``select_mkl`` before Paddle's first BLAS call: the entry points call it beside ``math_threads()``,
before they import Paddle.
"""
from __future__ import annotations

import os
import sys
from typing import MutableMapping

OPT_OUT = "RETFOUND_MKL"  # "bundled": Paddle's own MKLML
MALLOC_OPT_OUT = "RETFOUND_MALLOC"  # "system": glibc's default malloc thresholds
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest: HEAP_MAX_SIZE / 2 on 64-bit
TRIM_THRESHOLD = 512 << 20
_malloc_state: str | None = None
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


def keep_freed_memory(environ: MutableMapping[str, str] | None = None) -> str:
    """glibc keeps freed blocks below 32 MiB for reuse instead of returning them to the kernel (see the module
    docstring); once per process. Returns what was decided, in words."""
    global _malloc_state
    env = os.environ if environ is None else environ
    if env.get(MALLOC_OPT_OUT, "").strip().lower() == "system":
        return f"glibc's default malloc thresholds ({MALLOC_OPT_OUT}=system)"
    if _malloc_state is None:
        _malloc_state = "the system's malloc (not glibc)"
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL("libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                mallopt = None
            if mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 \
                    and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
                _malloc_state = (f"freed memory kept for reuse (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim "
                                 f"threshold {TRIM_THRESHOLD >> 20} MiB)")
    return _malloc_state


def select_mkl(environ: MutableMapping[str, str] | None = None) -> str:
    """Point Paddle at the current MKL (see the module docstring); returns what was decided, in words. In this
    process (``environ`` not given) it also calls ``keep_freed_memory``."""
    env = os.environ if environ is None else environ
    if environ is None:
        keep_freed_memory()
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
