"""NumPy compatibility shim that must run before ``numba.cuda`` is imported.

NumPy 2.5 removed ``np.row_stack`` (deprecated alias of ``np.vstack`` since NumPy 2.0). numba-cuda
(0.30.x, the CUDA target on our GPU image) still registers an overload for it while importing its array
support (``overload(np.row_stack)`` in ``numba/cuda/np/arrayobj.py``), so importing the CUDA target raises
``AttributeError`` under NumPy >= 2.5. Upstream will not fix it (numba-cuda issue #907). Restoring the
alias is exactly what older NumPy shipped, so it changes no behaviour. It is a no-op on older NumPy.
"""

from __future__ import annotations

import numpy as np

if "row_stack" not in vars(np):
    np.row_stack = np.vstack
