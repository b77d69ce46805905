"""Command line: ``python -m chainrule demo`` (also the ``chainrule`` command)
and ``python -m chainrule info``."""

from __future__ import annotations

import sys


def info() -> int:
    import numpy as np

    from . import __version__, _core, kernels
    build = _core._build_info()
    print(f"chainrule {__version__}")
    print(f"kernels:   {kernels.isa()} (this CPU runs: {', '.join(kernels.available_isas())})")
    print(f"threads:   {kernels.get_num_threads()}")
    print(f"OpenMP:    {build['openmp']}")
    print(f"compiler:  {build['compiler']}")
    print(f"ISA flags: {build['isa_flags']}")
    print(f"numpy:     {np.__version__}")
    return 0


def main(argv=None) -> int:
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
