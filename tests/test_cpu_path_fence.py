"""The Linux CPU fast path is fenced off (issue 24, item 5).

- Importing the library and every module of it, and running its models, with the CPU kernels
  not enabled does nothing beside: no process is started (no compiler), nothing is written to
  the user's home or cache, OpenBLAS is not loaded, the kernels' library is not loaded, and no
  array is changed in place (a fresh process with a temporary HOME / XDG_CACHE_HOME).
- The model files import nothing from the kernels (nor the BLAS loader): checked statically.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "s2dit_mlx"

# What the models are made of, and what runs them: plain MLX only.
MODEL_FILES = sorted(
    [
        *(PACKAGE / "models").glob("*.py"),
        *(PACKAGE / "attention").glob("*.py"),
        *(PACKAGE / name for name in ("generation.py", "cache.py", "sampling.py")),
        *(PACKAGE / name for name in ("pipeline.py", "loading.py", "transfer.py")),
    ]
)
FENCED = ("kernels", "_blas", "_python_m")

SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from pathlib import Path

    started = []
    real_init = subprocess.Popen.__init__

    def spy(self, args, *rest, **kwargs):
        started.append(str(args))
        return real_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = spy

    import s2dit_mlx

    package = Path(s2dit_mlx.__file__).parent
    names = sorted(
        "s2dit_mlx." + ".".join(p.relative_to(package).with_suffix("").parts)
        for p in package.rglob("*.py")
        if p.name != "__init__.py"
    )
    import importlib

    for name in names:
        importlib.import_module(name)
    blas_after_import = s2dit_mlx._blas.status

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    sys.path.insert(0, sys.argv[1])  # tests/: the tiny models (conftest calls setup_blas(),
    from conftest import make_tiny_components  # too late: mlx.core is already imported)
    from test_umt5 import TINY as TINY_UMT5
    from test_wan_vae import SIZES, _random_vae

    from s2dit_mlx import kernels
    from s2dit_mlx.kernels import modules
    from s2dit_mlx.models.umt5 import UMT5Config, UMT5TextEncoder

    rng = np.random.default_rng(0)
    dit, patch_vae, text = make_tiny_components(seed=1)
    wan = _random_vae("2.1", seed=2)
    umt5 = UMT5TextEncoder(UMT5Config(**TINY_UMT5))
    models = [dit, patch_vae, text, wan, umt5]
    mx.eval([m.parameters() for m in models])
    x = mx.array(rng.standard_normal((1, 3, 4, 8, 4)).astype(np.float32))
    t, ctx = mx.array([700.0]), mx.array(rng.standard_normal((1, 16, 16)).astype(np.float32))
    h, w = SIZES["2.1"]
    z = mx.array(rng.standard_normal((1, 3, h // 8, w // 8, 4)).astype(np.float32))
    ids = mx.array(rng.integers(0, TINY_UMT5["vocab_size"], (2, 12)))
    inputs = [x, t, ctx, z, ids]
    before = [np.array(a) for a in inputs]
    params = [{k: np.array(v) for k, v in tree_flatten(m.parameters())} for m in models]
    outs = [
        dit(x, t, ctx), patch_vae.decode(x), wan.decode(z), wan.encode(wan.decode(z)),
        umt5(ids), text.encode(["a red circle"]),
    ]
    mx.eval(outs)
    unchanged = all(np.array_equal(np.array(a), b) for a, b in zip(inputs, before))
    for m, p in zip(models, params):
        now = dict(tree_flatten(m.parameters()))
        unchanged = unchanged and all(np.array_equal(np.array(now[k]), v) for k, v in p.items())

    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    print(json.dumps({
        "started": started,
        "imported": len(names),
        "blas_status": blas_after_import,
        "openblas_mapped": "libopenblas" in maps or "cmeel.prefix" in maps,
        "kernels_mapped": "cpu_kernels-" in maps,
        "kernels_loaded": kernels.cpu.library.cache_info().currsize,
        "kernel_modules": sum(
            type(mod) in modules.PLAIN for m in models for _, mod in m.named_modules()
        ),
        "measured": len(kernels.measurements()),
        "unchanged": bool(unchanged),
    }))
    """
)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_import_and_plain_inference_touch_nothing(tmp_path):
    home, cache, tmp = tmp_path / "home", tmp_path / "cache", tmp_path / "tmp"
    for d in (home, cache, tmp):
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("S2DIT_NO_CPU_KERNELS",)}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(cache), TMPDIR=str(tmp))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "tests")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["imported"] > 40  # every module of the library, kernels included
    assert res["started"] == []  # no compiler (nor anything else) was run
    assert _files(home) == [] and _files(cache) == []  # nothing written for the user
    assert res["blas_status"] == "not-run" and not res["openblas_mapped"]
    assert res["kernels_loaded"] == 0 and not res["kernels_mapped"] and res["measured"] == 0
    assert res["kernel_modules"] == 0
    assert res["unchanged"]  # inputs and weights hold their values after the forward passes


def _imports(path: Path) -> list[str]:
    """Every module name and imported name of a file (relative imports keep their dots)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names]
    return found


def test_model_files_import_nothing_from_the_kernels():
    assert len(MODEL_FILES) > 12
    for path in MODEL_FILES:
        for name in _imports(path):
            parts = name.replace(".", " ").split()
            assert not any(part in FENCED for part in parts), f"{path.name} imports {name}"


def test_the_static_check_sees_an_import(tmp_path):
    """The check above would notice a model file that imports the kernels."""
    leaky = tmp_path / "leaky.py"
    leaky.write_text("from ..kernels import cpu as cpu_kernels\nfrom .. import kernels\n")
    flagged = [n for n in _imports(leaky) if any(p in FENCED for p in n.replace(".", " ").split())]
    assert flagged == ["..kernels", "..kernels.cpu", "...kernels"]
