"""Imported first by the `convert` and `train` packages, whose modules are entry points.

When this process was started as `python -m convert.X` / `python -m train.X`, Python imports
the package (and so this module) before the module's own imports, mlx.core among them: the
moment to load OpenBLAS (`_blas.setup_blas`, entry points only). Imported any other way
(`import train`, `s2dit train ...`, the tests) it does nothing. `import s2dit_mlx` never
imports it.
"""

from ._blas import setup_blas_if_run_as_module

setup_blas_if_run_as_module()
