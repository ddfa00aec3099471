"""Test-session settings.

On a machine without a GPU (no ``nvidia-smi``, no ``/dev/kfd``: CI and the CPU workstations), XLA
compiles the tests' CPU programs at LLVM optimization level 0. The suite is compile-bound (hundreds of
small programs, each compiled once): at level 0 it ran in 7.6 minutes instead of 11-12 on two cores
(2026-11-30), all tests passing. Every comparison in the suite runs both of its sides in this process
under the same setting. A machine with a GPU keeps XLA's default, so the device runs compile as users
do. Set before any test module imports jax (XLA reads the flag when it creates its backends).
"""

import os
import shutil

if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/kfd"):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
