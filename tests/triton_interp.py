"""Run Triton kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before
Triton is first imported), for tests of the project's kernels on machines without a GPU.

`install()` works around one incompatibility of Triton 3.6's interpreter with NumPy ≥ 2.3: it
keeps scalars as 1-element arrays, and `range(n)` over such a scalar then raises ("only
0-dimensional arrays can be converted to Python scalars"). Nothing changes on a GPU."""
from __future__ import annotations


def install() -> None:
    import numpy as np
    from triton.runtime import interpreter

    if getattr(interpreter, "_project_index_fix", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._project_index_fix = True
