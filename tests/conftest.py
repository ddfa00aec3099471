"""Test-session settings.

On a machine without a GPU (no ``nvidia-smi``, no ``/dev/kfd``: CI and the CPU workstations), XLA
compiles the tests' CPU programs at LLVM optimization level 0 and with its legacy LLVM IR emitters for
fusions (``--xla_cpu_use_fusion_emitters=false``: no MLIR fusion pipeline before LLVM). The suite is
compile-bound (about 5800 small programs, each compiled once): level 0 took it from 11-12 minutes to
7.6 on two cores (2026-11-30); since then the suite grew to 17 minutes at level 0 (2026-12-02), and
the legacy emitters bring that run to 11 (every test passing; a sample of five tests 30% faster in
alternating runs). Every comparison in the suite runs both of its sides in this process under the
same settings. A machine with a GPU keeps XLA's defaults, so the device runs compile as users do. Set
before any test module imports jax (XLA reads the flags when it creates its backends); subprocesses
the tests start (the sharding worker, the experiments' command lines) inherit them.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/kfd"):
    flags = " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + flags).strip()
