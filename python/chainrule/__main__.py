"""Command line: ``python -m chainrule demo`` (also the ``chainrule`` command)
and ``python -m chainrule info``."""

from __future__ import annotations

import sys


_OPENMP_VERSIONS = {201511: "4.5", 201811: "5.0", 202011: "5.1", 202111: "5.2"}


def _openmp_runtime() -> str:
    """The OpenMP library this process loaded (the wheel bundles its own)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "omp" in line.rsplit("/", 1)[-1]}
    except OSError:  # not Linux
        return "unknown"
    libs = sorted(p for p in paths if "/" in p and ".so" in p)
    return ", ".join(libs) or "not loaded"


def info() -> int:
    import platform

    import numpy as np

    from . import __version__, _core, kernels
    build = _core._build_info()
    spec = build["openmp"]
    print(f"chainrule {__version__} ({__file__.rsplit('/', 2)[0]})")
    print(f"python:    {platform.python_version()} on {platform.machine()}")
    print(f"kernels:   {kernels.isa()} (this CPU runs: {', '.join(kernels.available_isas())})")
    print(f"threads:   {kernels.get_num_threads()}")
    if isinstance(spec, int):
        print(f"OpenMP:    {_OPENMP_VERSIONS.get(spec, '?')} ({spec}), runtime {_openmp_runtime()}")
    else:
        print("OpenMP:    not compiled in")
    print(f"compiler:  {build['compiler']}")
    print(f"ISA flags: {build['isa_flags']}")
    print(f"numpy:     {np.__version__}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: chainrule {demo,info} [options]\n\n"
              "  demo [--out DIR] [--seed N]  the lecture end to end (see chainrule.demo)\n"
              "  info                         version, kernels in use, threads, build")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    if cmd == "info":
        return info()
    print(f"chainrule: unknown command {cmd!r}; expected 'demo' or 'info'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
