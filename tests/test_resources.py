"""The resource guard (s2dit_mlx/resources.py), thread defaults and the CPU kernels' bounds."""

# isort: off
import s2dit_mlx  # noqa: F401

# isort: on
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest
from cli_harness import assert_user_error, run_main, tree_state

from s2dit_mlx import _blas, cli, resources
from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.kernels import cpu as cpu_kernels
from s2dit_mlx.loading import TEACHER_MODEL_DIR
from s2dit_mlx.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    return Pipeline.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def builtin_pipe():
    if not (TEACHER_MODEL_DIR / "config.json").is_file():
        pytest.skip("the built-in model is not installed")
    return Pipeline.from_pretrained(str(TEACHER_MODEL_DIR))


# ----------------------------------------------------------------------------------------------
# Bad inputs: refused with one line, exit 2, nothing written


def _export_main(argv):
    from s2dit_mlx.coreml.cli import main

    return main(argv)


# (name, command, argv after the model, stderr must contain); "MODEL" and "OUT" are filled in.
HUGE_CASES = [
    ("generate-segfault-size", "generate", ["--height", "99968", "--width", "99968"], "memory"),
    ("generate-huge-square", "generate", ["--height", "100000", "--width", "100000"], "memory"),
    ("generate-huge-allowed", "generate", ["--height", "99968", "--width", "99968", "--allow-large"],
     "memory and swap"),
    ("generate-days", "generate", ["--frames", "400001", "--steps", "1000"], "estimated"),
    # (the 100000 x 100000 on the built-in model: ~58 GB; a million fails anywhere)
    ("export-huge", "export", ["--height", "1000000", "--width", "1000000"], "memory"),
]  # fmt: skip


@pytest.mark.parametrize("name, command, extra, match", HUGE_CASES, ids=[c[0] for c in HUGE_CASES])
def test_huge_requests_refused_before_any_write(
    tiny_model_dir, tmp_path, name, command, extra, match
):
    if command == "export":
        pytest.importorskip("coremltools")
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("a file of the user's")
    before = tree_state(tmp_path)
    if command == "generate":
        argv = ["generate", "a red fox", "--model", str(tiny_model_dir), "-o", str(work / "o.mp4")]
        code, _, err = run_main(cli.main, [*argv, *extra])
    else:
        argv = ["coreml", "--model", str(tiny_model_dir), "--out", str(work / "export")]
        code, _, err = run_main(_export_main, [*argv, *extra])
    assert_user_error(code, err, match=match)
    assert "estimated" in err or "needs arrays" in err  # the estimate is in the message
    assert tree_state(tmp_path) == before


@pytest.fixture
def little_memory(monkeypatch):
    """Pretend only 1 MB is available: any request is 'too large' for the guard."""
    monkeypatch.setattr(resources, "available_memory", lambda: 1_000_000)


def test_generate_refused_then_allowed_with_flag(little_memory, tiny_model_dir, tmp_path):
    out = tmp_path / "o.mp4"
    argv = ["generate", "a red fox", "--model", str(tiny_model_dir), "-o", str(out), "-q"]
    code, _, err = run_main(cli.main, argv)
    assert_user_error(code, err, match="more than the 1 MB available")
    assert "--allow-large" in err
    assert list(tmp_path.iterdir()) == []
    code, _, err = run_main(cli.main, [*argv, "--allow-large"])
    assert code == 0, err
    assert out.is_file() and out.with_suffix(".json").is_file()


def test_export_refused_then_allowed_with_flag(little_memory, tiny_model_dir, tmp_path):
    pytest.importorskip("coremltools")
    out = tmp_path / "export"
    argv = ["coreml", "--model", str(tiny_model_dir), "--out", str(out), "-q"]
    code, _, err = run_main(_export_main, argv)
    assert_user_error(code, err, match="exporting at 64x32 needs an estimated")
    assert list(tmp_path.iterdir()) == []
    code, _, err = run_main(_export_main, [*argv, "--allow-large"])
    assert code == 0, err
    assert (out / "manifest.json").is_file()


def test_long_generation_prints_its_time_estimate(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.setattr(resources, "NOTE_SECONDS", 0.0)
    argv = ["generate", "a red fox", "--model", str(tiny_model_dir), "-o", str(tmp_path / "o.gif")]
    code, _, err = run_main(cli.main, argv)
    assert code == 0, err
    assert "note: estimated" in err and "of memory" in err and "rough estimate" in err
    code, _, err = run_main(cli.main, [*argv[:-1], str(tmp_path / "p.gif"), "-q"])
    assert code == 0 and "note:" not in err  # --quiet: no note


# ----------------------------------------------------------------------------------------------
# The estimate itself


def test_generate_estimate_grows_with_every_size(tiny_pipe):
    base = tiny_pipe.estimate(height=64, width=64, frames=9)
    for bigger in (
        dict(height=128, width=64, frames=9),
        dict(height=64, width=128, frames=9),
        dict(height=64, width=64, frames=33),
    ):
        est = tiny_pipe.estimate(**bigger)
        assert est.peak_bytes > base.peak_bytes, bigger
        assert est.seconds > base.seconds, bigger
    steps = tiny_pipe.estimate(height=64, width=64, frames=9, steps=20)
    assert steps.seconds > base.seconds and steps.peak_bytes == base.peak_bytes
    sizes = [tiny_pipe.estimate(height=s, width=s).peak_bytes for s in (64, 128, 256, 512)]
    assert sizes == sorted(sizes) and sizes[-1] > 10 * sizes[0]


def test_guidance_doubles_the_streaming_activations(tiny_pipe):
    one = tiny_pipe.estimate(height=128, width=128, guidance=1.0, mode="streaming")
    two = tiny_pipe.estimate(height=128, width=128, guidance=3.0, mode="streaming")
    # Guidance runs prompt and negative prompt as one batch of 2: every activation doubles.
    assert two.parts["dit_activations"] == pytest.approx(2 * one.parts["dit_activations"])
    assert two.parts["dit_cache"] == pytest.approx(2 * one.parts["dit_cache"])
    assert two.parts["weights"] == one.parts["weights"]
    assert two.seconds > one.seconds


def test_bidirectional_attends_to_the_whole_video(tiny_pipe):
    kw = dict(height=128, width=128, frames=33, guidance=1.0)
    stream = tiny_pipe.estimate(mode="streaming", **kw)
    whole = tiny_pipe.estimate(mode="bidirectional", **kw)
    assert whole.parts["dit_activations"] > 2 * stream.parts["dit_activations"]


def test_half_precision_dit_needs_less(tiny_model_dir):
    f32 = Pipeline.from_pretrained(str(tiny_model_dir)).estimate(height=256, width=256)
    f16 = Pipeline.from_pretrained(str(tiny_model_dir), dtype="float16").estimate(
        height=256, width=256
    )
    assert f16.parts["weights"] < f32.parts["weights"]
    assert f16.parts["dit_activations"] < f32.parts["dit_activations"]


@pytest.mark.parametrize("size", [64, 128])
def test_estimate_within_25_percent_of_measured_peak(builtin_pipe, size):
    """MLX's peak (what the memory model computes term by term) on the built-in model."""
    est = builtin_pipe.estimate(height=size, width=size)
    mx.eval(builtin_pipe.dit.parameters(), builtin_pipe.vae.parameters())
    mx.reset_peak_memory()
    builtin_pipe.generate("a red circle moving left", seed=0, height=size, width=size)
    measured = mx.get_peak_memory()
    assert abs(est.mlx_bytes - measured) <= 0.25 * measured, (est.mlx_bytes, measured)


def test_export_estimate_grows_with_size(tiny_pipe):
    pytest.importorskip("coremltools")
    from s2dit_mlx.coreml.export import check_export

    peaks = []
    for size in (64, 512, 2048):
        shapes = check_export(tiny_pipe.dit, tiny_pipe.vae, size, size, None, None, None,
                              "none", "float16")  # fmt: skip
        est = resources.estimate_export(tiny_pipe.dit, tiny_pipe.vae, shapes, size, size)
        peaks.append(est.peak_bytes)
        assert est.parts["weights"] > 0 and est.what == f"exporting at {size}x{size}"
    assert peaks[0] < peaks[1] < peaks[2]
    f32 = resources.estimate_export(tiny_pipe.dit, None, shapes, 2048, 2048, "float32")
    assert f32.parts["weights"] > est.parts["weights"]


def test_check_message_and_flag():
    est = resources.Estimate(what="doing it", peak_bytes=3e9, largest_array_bytes=1e6)
    with pytest.raises(S2DiTError, match=r"doing it needs an estimated 3 GB .* 2 GB available"):
        resources.check(est, available=2_000_000_000)
    resources.check(est, allow=True, available=2_000_000_000)
    resources.check(est, available=4_000_000_000)
    slow = resources.Estimate(what="it", peak_bytes=1, seconds=10 * 86400.0)
    with pytest.raises(S2DiTError, match="10 days"):
        resources.check(slow, available=10**12)
    resources.check(slow, allow=True, available=10**12)
    # One array larger than memory + swap cannot be allowed: MLX would crash on it.
    impossible = resources.Estimate(what="it", peak_bytes=1, largest_array_bytes=1e18)
    with pytest.raises(S2DiTError, match="memory and swap"):
        resources.check(impossible, allow=True, available=10**19)


def test_available_memory_is_sane():
    avail = resources.available_memory()
    ceiling = resources.memory_ceiling()
    if sys.platform.startswith("linux"):
        assert avail is not None and 0 < avail <= ceiling
    assert resources.format_bytes(1.5e9) == "1.5 GB"
    assert resources.format_seconds(7200) == "2.0 h"


# ----------------------------------------------------------------------------------------------
# Threads


def test_kernel_threads_follow_the_environment(monkeypatch):
    for name in (cpu_kernels.THREADS_ENV, "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert cpu_kernels.gemm_threads() == _blas.usable_cpus()
    assert _blas.usable_cpus() <= len(os.sched_getaffinity(0))
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert cpu_kernels.gemm_threads() == 3
    monkeypatch.setenv(cpu_kernels.THREADS_ENV, "1")
    assert cpu_kernels.gemm_threads() == 1


@pytest.mark.skipif(_blas.status != "openblas", reason="OpenBLAS is not in use here")
def test_openblas_is_single_threaded_unless_asked():
    code = (
        "from s2dit_mlx import _blas; _blas.setup_blas(); import mlx.core; "
        "print(_blas.openblas_threads)"
    )
    env = {k: v for k, v in os.environ.items() if k not in _blas.THREAD_ENVS}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "1", out.stderr
    env["OPENBLAS_NUM_THREADS"] = "2"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "2", out.stderr


# ----------------------------------------------------------------------------------------------
# CPU kernels: sizes they cannot take are refused or left to MLX, never read out of bounds

# Run in a subprocess: before the fix these cases read or wrote out of bounds or segfaulted,
# and a regression must fail this test, not kill the test run.
BOUNDS_SCRIPT = textwrap.dedent(
    """
    import json, ctypes
    import s2dit_mlx
    import mlx.core as mx
    from s2dit_mlx.errors import S2DiTError
    from s2dit_mlx.kernels import cpu as K

    res = {}
    n = lambda *s: mx.random.normal(s)
    K.MIN_ELEMENTS = K.MIN_GEMM_MACS = 1  # the kernels take any size: only shapes decide
    # The array that crashed `generate --height 99968 --width 99968` (never evaluated).
    huge = mx.zeros((2, 117_112_512, 128))
    try:
        K.linear(huge, n(128, 128))
        res["huge"] = "ran"
    except S2DiTError as err:
        res["huge"] = str(err)
    if K.gemm_available():
        x = n(300, 256)
        res["linear_k_mismatch"] = K.linear(x, n(64, 200)) is None
        res["linear_bias_mismatch"] = K.linear(x, n(64, 256), n(10)) is None
        xs = n(1, 4, 9, 13, 20)
        res["conv_cin_mismatch"] = K.conv3d(xs, n(40, 3, 3, 3, 8), None, None, True,
                                            (1, 1)) is None
        res["conv_history_mismatch"] = K.conv3d(xs, n(40, 3, 3, 3, 20), None,
                                                n(1, 2, 5, 5, 20), True, (1, 1)) is None
        q = n(2, 3, 64, 32)
        res["attention_batch_mismatch"] = K.attention(q, n(1, 3, 70, 32), n(2, 3, 70, 32),
                                                      0.1) is None
        res["attention_value_rows"] = K.attention(q, n(2, 3, 70, 32), n(2, 3, 60, 32),
                                                  0.1) is None
        lib = K.library()
        strides = (ctypes.c_int64 * 12)()
        # The C++ refuses sizes it cannot take before touching any pointer.
        res["cpp_attention_no_keys"] = lib.s2dit_attention(
            1, 1, 4, 0, 32, None, None, None, None, strides, 1.0, 4, 1)
        res["cpp_linear_bad_k"] = lib.s2dit_linear(4, 16, 0, None, 0, None, None, None, 1)
        res["cpp_conv_bad_size"] = lib.s2dit_conv3d(None, 1, 4, 4, 8, 1, 3, 3, 3, 0, 0,
                                                    None, None, 8, None, 1)
    lib = K.library()
    if lib is not None:
        # The elementwise entry points refuse sizes they cannot take before any pointer.
        res["cpp_silu_negative_count"] = lib.s2dit_silu(None, None, -1, 1)
        res["cpp_softmax_no_columns"] = lib.s2dit_softmax(None, None, 4, 0, 1)
    print(json.dumps(res))
    """
)


def test_kernels_refuse_sizes_they_cannot_take():
    out = subprocess.run(
        [sys.executable, "-c", BOUNDS_SCRIPT], capture_output=True, text=True, cwd=ROOT,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["huge"].startswith("out of memory: a [2, 117112512, 128] array of 120 GB")
    if not cpu_kernels.gemm_available():
        return
    for key, value in res.items():
        if key.startswith("cpp_"):
            assert value == 1, key
        elif key != "huge":
            assert value is True, key


def test_segfault_reproduction_now_fails_cleanly(tmp_path):
    """The command of the issue, in a subprocess with the guard passed: one line, exit 2."""
    out = tmp_path / "o.gif"
    argv = ["generate", "a red circle", "--height", "99968", "--width", "99968", "-o", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "s2dit_mlx.cli", *argv, "--allow-large"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert_user_error(done.returncode, done.stderr, match="memory and swap")
    assert list(tmp_path.iterdir()) == []


def test_visible_chunk_count_matches_the_cache():
    from types import SimpleNamespace

    from s2dit_mlx.cache import ChunkSchedule

    for window in (None, 1, 2, 3, 5):
        for sink in (0, 1, 2, 4):
            args = SimpleNamespace(window=window, sink=sink)
            for chunk in range(12):
                expected = len(ChunkSchedule(window, sink).visible(chunk))
                assert resources._visible(args, chunk) == expected, (window, sink, chunk)


def test_small_products_stay_on_one_thread(monkeypatch):
    monkeypatch.setenv(cpu_kernels.THREADS_ENV, "2")
    assert cpu_kernels.threads_for(1000) == 1
    assert cpu_kernels.threads_for(cpu_kernels.MACS_PER_THREAD * 2) == 2
    assert cpu_kernels.threads_for(cpu_kernels.MACS_PER_THREAD * 100) == 2


@pytest.mark.skipif(not cpu_kernels.gemm_available(), reason="the kernels' GEMM needs AVX-512F")
def test_threaded_kernels_match_mlx(monkeypatch):
    """Every share on its own thread (3 threads whatever the size): same results as MLX."""
    monkeypatch.setenv(cpu_kernels.THREADS_ENV, "3")
    for name in ("MACS_PER_THREAD", "MIN_ELEMENTS", "MIN_GEMM_MACS"):
        monkeypatch.setattr(cpu_kernels, name, 1)

    def normal(*shape):
        return mx.random.normal(shape, key=mx.random.key(sum(shape)))

    x, w, b = normal(300, 70), normal(50, 70), normal(50)
    q, k, v = normal(2, 3, 40, 32), normal(2, 3, 45, 32), normal(2, 3, 45, 32)
    xs, wc = normal(1, 3, 6, 7, 20), normal(24, 3, 3, 3, 20)
    lin = cpu_kernels.linear(x, w, b)
    att = cpu_kernels.attention(q, k, v, 0.2)
    conv = cpu_kernels.conv3d(xs, wc, None, None, False, (1, 1))
    ref_conv = mx.conv3d(mx.pad(xs, [(0, 0), (0, 0), (1, 1), (1, 1), (0, 0)]), wc)
    ref_att = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2)
    for out, ref in ((lin, x @ w.T + b), (att, ref_att), (conv, ref_conv)):
        assert out is not None and out.shape == ref.shape
        assert mx.allclose(out, ref, atol=1e-4, rtol=1e-4).item()  # float32 sums, other order


def test_estimate_with_a_wan_vae():
    """The Wan VAE branch of the model: runs, grows with size, and is in the right range
    (coarser than the patch VAE's: within 2x of MLX's measured peak on a tiny random one)."""
    from conftest import TINY_DEFAULTS, make_tiny_components

    from s2dit_mlx.models.wan_vae import WanVAE, WanVAEConfig

    dit, _, text_encoder = make_tiny_components(seed=1)
    config = WanVAEConfig(version="2.1", base_dim=4, z_dim=4, dim_mult=[1, 2, 2, 2])
    config.num_res_blocks = 1
    vae = WanVAE(config)
    mx.eval(vae.parameters())
    pipe = Pipeline(dit, vae, text_encoder, defaults=TINY_DEFAULTS)
    peaks = [pipe.estimate(height=s, width=s).peak_bytes for s in (64, 128, 256)]
    assert peaks == sorted(peaks)
    est = pipe.estimate(height=128, width=128)
    mx.reset_peak_memory()
    pipe.generate("a fox", seed=0, height=128, width=128)
    measured = mx.get_peak_memory()
    assert 0.5 * measured <= est.mlx_bytes <= 2 * measured, (est.mlx_bytes, measured)
