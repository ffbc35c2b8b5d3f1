"""fp32 GEMM throughput: MLX with our OpenBLAS setup vs numpy vs MLX's bundled reference BLAS.

Each configuration runs in its own subprocess so that which BLAS gets loaded is decided cleanly:

- ``mlx``:           ``s2dit_mlx.setup_blas()`` first (loads OpenBLAS on Linux), then MLX matmuls.
- ``numpy``:         numpy's own BLAS on the same machine, for comparison.
- ``mlx_reference``: MLX with ``S2DIT_NO_OPENBLAS=1``, i.e. what the ``mlx[cpu]`` wheel links.

Writes benchmarks/results/gemm.json and prints a markdown table.  OPENBLAS_CORETYPE /
OPENBLAS_L2_SIZE are left as they are (some machines set them; they can slow numpy) and are
recorded, together with the OpenBLAS kernel each process reports.

Shared machines are noisy: each configuration runs in ``--rounds`` separate processes,
interleaved, and the best time per size is kept.

    python benchmarks/gemm.py [--sizes 1024 2048] [--repeats 5] [--rounds 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "mlx": {},
    "numpy": {},
    "mlx_reference": {"S2DIT_NO_OPENBLAS": "1"},
}
ENV_KEYS = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "S2DIT_NO_OPENBLAS",
)


def _openblas_kernels(match: str | None) -> list[dict]:
    """Kernel and thread count of each OpenBLAS loaded here whose path contains `match`."""
    if match is None:
        return []
    try:  # threadpoolctl knows every BLAS flavour; use it where installed
        from threadpoolctl import threadpool_info

        return [
            {
                "library": i.get("filepath"),
                "api": i.get("internal_api"),
                "kernel": i.get("architecture"),
                "threads": i.get("num_threads"),
            }
            for i in threadpool_info()
            if i.get("user_api") == "blas" and match in (i.get("filepath") or "")
        ]
    except ImportError:
        pass
    # Fallback (Linux): ask each mapped libopenblas for its core name through ctypes.
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({ln.split()[-1] for ln in f if "openblas" in ln and match in ln})
    except OSError:
        return [{"note": "threadpoolctl not installed and /proc/self/maps unavailable"}]
    found = []
    for lib in libs:
        handle = ctypes.CDLL(lib)
        entry: dict = {"library": lib}
        for prefix, suffix in (("", ""), ("scipy_", "64_"), ("", "64_"), ("scipy_", "")):
            fn = getattr(handle, f"{prefix}openblas_get_corename{suffix}", None)
            if fn is None:
                continue
            fn.restype = ctypes.c_char_p
            entry["kernel"] = fn().decode()
            threads = getattr(handle, f"{prefix}openblas_get_num_threads{suffix}", None)
            if threads is not None:
                threads.restype = ctypes.c_int
                entry["threads"] = threads()
            break
        found.append(entry)
    return found


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def worker(kind: str, sizes: list[int], repeats: int) -> dict:
    """Run inside the subprocess: measure one configuration."""
    out: dict = {"gflops": {}}
    if kind == "numpy":
        import numpy as np

        rng = np.random.default_rng(0)
        for n in sizes:
            a = rng.standard_normal((n, n), dtype=np.float32)
            b = rng.standard_normal((n, n), dtype=np.float32)
            out["gflops"][str(n)] = (
                2.0 * n**3 / _best_seconds(lambda a=a, b=b: a @ b, repeats) / 1e9
            )
        out["blas"] = np.__config__.CONFIG["Build Dependencies"]["blas"].get("name", "?")
        # numpy's wheels bundle their OpenBLAS under numpy.libs (Linux) or numpy/.dylibs (macOS)
        out["openblas"] = _openblas_kernels("numpy")
    else:
        from s2dit_mlx import _blas

        _blas.setup_blas()  # before mlx.core (OpenBLAS; S2DIT_NO_OPENBLAS=1: the reference)
        from s2dit_mlx.info import gemm_gflops

        # The reference BLAS manages ~5 GFLOP/s: fewer repeats keep the run short.
        reps = repeats if _blas.status == "openblas" else min(repeats, 2)
        for n in sizes:
            out["gflops"][str(n)] = gemm_gflops(n, repeats=reps)
        out["blas"] = _blas.describe()
        out["status"] = _blas.status
        out["openblas"] = _openblas_kernels(_blas.library)
    return out


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "python": platform.python_version(),
        # other work on the machine skews the figures: record how busy it was
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ.get(k) for k in ENV_KEYS},
    }


def _versions() -> dict:
    code = "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in %r}))"
    pkgs = ["mlx", "numpy", "cmeel-openblas"]
    try:
        res = subprocess.run(
            [sys.executable, "-c", code % pkgs], capture_output=True, text=True, check=True
        )
        return json.loads(res.stdout)
    except (subprocess.CalledProcessError, json.JSONDecodeError):
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gemm.json")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes, args.repeats)))
        return

    machine = _machine()  # before the runs, so the load average is other work's
    results: dict = {}
    for rnd in range(args.rounds):
        for name, extra_env in CONFIGS.items():
            env = {k: v for k, v in os.environ.items() if k != "S2DIT_NO_OPENBLAS"}
            env.update(extra_env)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--sizes"]
            cmd += [str(n) for n in args.sizes] + ["--repeats", str(args.repeats)]
            print(f"round {rnd + 1}: {name} ...", file=sys.stderr, flush=True)
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            if name in results:  # keep the best figure per size across rounds
                for n, g in r["gflops"].items():
                    r["gflops"][n] = max(g, results[name]["gflops"][n])
            results[name] = r

    ratios: dict = {"mlx/numpy": {}, "mlx/mlx_reference": {}}
    for n in map(str, args.sizes):
        mlx = results["mlx"]["gflops"][n]
        ratios["mlx/numpy"][n] = mlx / results["numpy"]["gflops"][n]
        ratios["mlx/mlx_reference"][n] = mlx / results["mlx_reference"]["gflops"][n]

    report = {
        "benchmark": "fp32 GEMM n x n x n, best of repeats, GFLOP/s = 2n^3 / seconds / 1e9",
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "rounds": args.rounds,
        "machine": machine,
        "versions": _versions(),
        "results": results,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)

    header = "| config | BLAS | " + " | ".join(f"n={n} GFLOP/s" for n in args.sizes) + " |"
    print(header)
    print("|" + "---|" * (2 + len(args.sizes)))
    for name, r in results.items():
        kernels = ", ".join(k["kernel"] for k in r["openblas"] if "kernel" in k)
        blas = r["blas"] + (f" [{kernels}]" if kernels else "")
        cells = " | ".join(f"{r['gflops'][str(n)]:.1f}" for n in args.sizes)
        print(f"| {name} | {blas} | {cells} |")
    for key, vals in ratios.items():
        cells = " | ".join(f"{vals[str(n)]:.2f}x" for n in args.sizes)
        print(f"| ratio {key} | | {cells} |")
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
