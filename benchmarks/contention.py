"""Generation time with another CPU-bound process on the machine, per thread setting.

Writes benchmarks/results/contention.json. Each run is a fresh process with one thread
setting (OpenBLAS reads its thread count when it loads) that loads the built-in model, warms
up, then times --clips generations of the README's prompt. A round runs every setting with
a competing CPU-bound process (started here, one `while True: pass` per --competitors, or
numpy matmuls with --competitor matmul) and again without it, the order of settings rotating
from round to round; medians over every clip of every round are compared.

Settings: "default" (no thread variables: what a user gets: one OpenBLAS thread, the CPU
kernels on every usable CPU), "1 thread" (OpenBLAS and our kernels single-threaded), "N
threads, short spin" (both at every usable CPU, OPENBLAS_THREAD_TIMEOUT=4: OpenBLAS's idle
threads sleep at once instead of spinning ~0.1 s) and "N threads (old default)" (both at every
usable CPU, which is what the defaults were before OpenBLAS was made single-threaded). Each
worker runs the model as `s2dit generate` does (setup_blas, the CPU kernels enabled). Goal:
default within 1.2x of the best setting on the busy machine, and no slower than before on a
quiet one.

    python benchmarks/contention.py            # 64x64 and 256x256, 3 rounds (~30 min)
    python benchmarks/contention.py --small    # 64x64, 1 round, 1 clip; writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import write_result

HERE = Path(__file__).parent
PROMPT = "a red circle moving left on a black background"
THREAD_VARS = (
    "OPENBLAS_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OMP_NUM_THREADS",
    "S2DIT_NUM_THREADS",
    "OPENBLAS_THREAD_TIMEOUT",
)

WORKER = r"""
import json, sys, time
import s2dit_mlx
s2dit_mlx.setup_blas()  # what `s2dit generate` does: OpenBLAS, then its models on the kernels
from s2dit_mlx import kernels
from s2dit_mlx.loading import TEACHER_MODEL_DIR
from s2dit_mlx.pipeline import Pipeline

prompt, clips, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = Pipeline.from_pretrained(str(TEACHER_MODEL_DIR))
kernels.enable_on_cpu(pipe.dit, pipe.vae, pipe.text_encoder)
pipe.generate(prompt, seed=0, steps=2, height=size, width=size)  # warm-up: kernels, caches
times = []
for i in range(clips):
    start = time.perf_counter()
    pipe.generate(prompt, seed=i, height=size, width=size)
    times.append(time.perf_counter() - start)
print("RESULT " + json.dumps(times))
"""

COMPETITORS = {
    "spin": "while True: pass",
    "matmul": "import numpy as np\na = np.random.rand(512, 512)\nwhile True: a @ a",
}


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def settings() -> dict[str, dict[str, str]]:
    n = str(usable_cpus())
    return {
        "default": {},
        "1 thread": {"OPENBLAS_NUM_THREADS": "1", "S2DIT_NUM_THREADS": "1"},
        f"{n} threads, short spin": {
            "OPENBLAS_NUM_THREADS": n,
            "S2DIT_NUM_THREADS": n,
            "OPENBLAS_THREAD_TIMEOUT": "4",
        },
        f"{n} threads (old default)": {"OPENBLAS_NUM_THREADS": n, "S2DIT_NUM_THREADS": n},
    }


def run_worker(
    env_extra: dict[str, str], clips: int, size: int, timeout: float
) -> list[float] | None:
    """Seconds per clip of one fresh process, or None when it ran past `timeout`."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(env_extra)
    try:
        done = subprocess.run(
            [sys.executable, "-c", WORKER, PROMPT, str(clips), str(size)],
            env=env,
            capture_output=True,
            text=True,
            cwd=HERE.parent,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({env_extra}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def start_competitors(kind: str, count: int) -> list[subprocess.Popen]:
    """`count` CPU-bound processes of `kind`, each in its own process group."""
    return [
        subprocess.Popen(
            [sys.executable, "-c", COMPETITORS[kind]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(count)
    ]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def measure(opts, size: int, configs: dict) -> dict:
    """Alternating busy / quiet rounds of every setting at size x size; the summary."""
    names = list(configs)
    runs: dict[str, dict[str, list]] = {n: {"quiet": [], "busy": []} for n in names}
    for r in range(opts.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for phase in ("busy", "quiet"):
            procs = start_competitors(opts.competitor, opts.competitors) if phase == "busy" else []
            try:
                time.sleep(0.5 if procs else 0.0)
                for name in order:
                    times = run_worker(configs[name], opts.clips, size, opts.timeout)
                    load = os.getloadavg()[0]
                    runs[name][phase].append({"clip_s": times, "loadavg_1min": load})
                    shown = "timed out" if times is None else " ".join(f"{t:.2f}" for t in times)
                    print(f"{size} round {r + 1} {phase:5s} {name:24s} {shown} s (load {load:.1f})")
            finally:
                stop(procs)

    def median(name: str, phase: str) -> float:
        clips = [t for run in runs[name][phase] for t in (run["clip_s"] or [opts.timeout])]
        return statistics.median(clips)

    table = {
        n: {
            "env": configs[n],
            "quiet_median_s": median(n, "quiet"),
            "busy_median_s": median(n, "busy"),
            "runs": runs[n],
        }
        for n in names
    }
    best = min(table[n]["busy_median_s"] for n in names)
    old = names[-1]
    return {
        "size": size,
        "settings": table,
        "busy_default_over_best": table["default"]["busy_median_s"] / best,
        "quiet_default_over_old": table["default"]["quiet_median_s"] / table[old]["quiet_median_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clips", type=int, default=2, help="timed clips per run")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[64, 256], help="frame sizes (256: our kernels)"
    )
    parser.add_argument("--competitor", choices=sorted(COMPETITORS), default="spin")
    parser.add_argument("--competitors", type=int, default=1, help="competing processes")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--out", default=None, help="default: results/contention.json")
    parser.add_argument(
        "--small", action="store_true", help="64x64, 1 round, 1 clip; no JSON unless --out"
    )
    opts = parser.parse_args()
    if opts.small:
        opts.sizes, opts.rounds, opts.clips = [64], 1, 1
    elif opts.out is None:
        opts.out = str(HERE / "results" / "contention.json")

    # A kill of this script still stops the competitors and the running worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    configs = settings()
    load_start = os.getloadavg()
    results = [measure(opts, size, configs) for size in opts.sizes]
    result = {
        "benchmark": "contention",
        "model": "built-in (s2dit_mlx/assets/teacher), 33 frames, 16 steps, guidance 3",
        "competitor": f"{opts.competitors} x {opts.competitor} ({COMPETITORS[opts.competitor]!r})",
        "rounds": opts.rounds,
        "clips_per_run": opts.clips,
        "sizes": results,
        "machine": {
            "platform": platform.platform(),
            "usable_cpus": usable_cpus(),
            "loadavg_at_start": load_start,
            "shared": "other helpers ran tests on this machine at the same time: 'quiet' is "
            "the machine without our competitor, not an idle one",
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    if opts.out is not None:
        write_result(opts.out, result)
    for res in results:
        for n, row in res["settings"].items():
            print(
                f"{res['size']}x{res['size']} {n:26s} quiet {row['quiet_median_s']:.2f} s, "
                f"busy {row['busy_median_s']:.2f} s"
            )
        print(
            f"{res['size']}x{res['size']}: busy default / best "
            f"{res['busy_default_over_best']:.2f} (goal <= 1.2); quiet default / old default "
            f"{res['quiet_default_over_old']:.2f}"
        )
    if opts.out is not None:
        print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
