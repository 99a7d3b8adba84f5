"""`python -m layers.cpu_kernels`: build the native CPU kernels now (make install runs it)."""

import sys

from layers.cpu_kernels import build

if __name__ == "__main__":
    try:
        build(verbose="-v" in sys.argv)
    except Exception as exc:  # the install still succeeds: every kernel has a torch fallback
        print(f"native CPU kernels not built ({exc}); the pure-torch paths will be used", file=sys.stderr)
    else:
        print("native CPU kernels built")
