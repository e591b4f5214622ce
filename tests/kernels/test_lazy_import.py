"""`import snce` and `import snce.losses.kernels` must not import Triton (it loads only when a kernel is used)."""

import subprocess
import sys


def test_importing_snce_and_the_kernels_package_does_not_import_triton():
    code = (
        "import sys, snce, snce.functional, snce.losses.kernels as k; "
        "assert 'triton' not in sys.modules, 'triton was imported'; "
        "print(k.supports.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
