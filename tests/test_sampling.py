"""Schedules and solvers against the official Wan code (wan22) and diffusers."""

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.sampling import (
    WAN_NEGATIVE_PROMPT,
    FlowEulerSolver,
    FlowUniPCSolver,
    add_noise,
    cfg,
    few_step_timesteps,
    make_solver,
    shift_sigmas,
)

# isort: split
import mlx.core as mx

STATE_TOL = 1e-5  # max |ours - reference| on every intermediate sample
STEPS = (10, 50)
SHIFTS = (1.0, 3.0, 5.0, 12.0)
C = 8  # last axis of the toy samples; the toy model mixes it with a fixed matrix


def _wan_dir() -> Path:
    # find_spec on a top-level package locates it without running wan/__init__ (CUDA imports).
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("official Wan code (wan22) not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _load_wan_module(rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, _wan_dir() / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def wan_unipc(torch):
    pytest.importorskip("diffusers")
    return _load_wan_module("utils/fm_solvers_unipc.py", "_wan_fm_solvers_unipc")


@pytest.fixture(scope="module")
def wan_dpm(torch):
    pytest.importorskip("diffusers")
    return _load_wan_module("utils/fm_solvers.py", "_wan_fm_solvers")


class ToyModel:
    """v(x, t) = x @ W + sin(0.003 t + phase): the same maths in torch and MLX."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.w = (0.8 * rng.standard_normal((C, C)) / np.sqrt(C)).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, C).astype(np.float32)

    def torch(self, torch, x, t: float):
        w, ph = torch.from_numpy(self.w), torch.from_numpy(self.phase)
        return x @ w + torch.sin(0.003 * t + ph)

    def mx(self, x, t: float):
        return x @ mx.array(self.w) + mx.sin(0.003 * t + mx.array(self.phase))


def _noise(seed: int = 1, shape=(2, 4, 3, C)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _run_pair(torch, ref, ref_timesteps, ours, model):
    """Step the reference scheduler and our solver side by side; return per-step max errors."""
    assert len(ref_timesteps) == len(ours.timesteps)
    x_t = torch.from_numpy(_noise())
    x_m = mx.array(_noise())
    errs = []
    for k, t in enumerate(ref_timesteps):
        assert float(t) == ours.timesteps[k]
        x_t = ref.step(model.torch(torch, x_t, float(t)), t, x_t, return_dict=False)[0]
        x_m = ours.step(model.mx(x_m, float(ours.timesteps[k])), x_m)
        errs.append(float(np.abs(np.array(x_m) - x_t.numpy()).max()))
    # The trajectory must have gone somewhere, or matching it would prove nothing.
    assert np.abs(x_t.numpy() - _noise()).max() > 0.1
    return errs


def _wan_unipc_ref(wan_unipc, steps, shift, order=2):
    # Exactly as wan/text2video.py builds it for sample_solver="unipc".
    ref = wan_unipc.FlowUniPCMultistepScheduler(
        num_train_timesteps=1000, shift=1, use_dynamic_shifting=False, solver_order=order
    )
    ref.set_timesteps(steps, device="cpu", shift=shift)
    return ref


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_unipc_matches_wan(torch, wan_unipc, steps, shift):
    ref = _wan_unipc_ref(wan_unipc, steps, shift)
    ours = FlowUniPCSolver(steps, shift)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float64))
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    assert ours.sigmas[-1] == 0.0 and ours.sigmas.dtype == np.float32
    errs = _run_pair(torch, ref, ref.timesteps, ours, ToyModel())
    assert max(errs) < STATE_TOL, errs


@pytest.mark.parametrize("order", (1, 3))
def test_unipc_other_orders_match_wan(torch, wan_unipc, order):
    ref = _wan_unipc_ref(wan_unipc, 12, 5.0, order=order)
    ours = FlowUniPCSolver(12, 5.0, solver_order=order)
    errs = _run_pair(torch, ref, ref.timesteps, ours, ToyModel(3))
    assert max(errs) < STATE_TOL, errs


def test_unipc_comparison_can_fail(torch, wan_unipc):
    # Negative control: a first-order UniPC must be told apart from Wan's second order.
    ref = _wan_unipc_ref(wan_unipc, 10, 5.0)
    errs = _run_pair(
        torch, ref, ref.timesteps, FlowUniPCSolver(10, 5.0, solver_order=1), ToyModel()
    )
    assert max(errs) > 100 * STATE_TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_euler_matches_wan_schedule(torch, wan_dpm, steps, shift):
    # Wan's "dpm++" path schedule; DPM-Solver-1 (data prediction) on a linear flow is Euler.
    ref = wan_dpm.FlowDPMSolverMultistepScheduler(
        num_train_timesteps=1000, shift=1, use_dynamic_shifting=False, solver_order=1
    )
    timesteps, _ = wan_dpm.retrieve_timesteps(
        ref, device="cpu", sigmas=wan_dpm.get_sampling_sigmas(steps, shift)
    )
    ours = FlowEulerSolver(steps, shift)
    np.testing.assert_array_equal(ours.timesteps, timesteps.numpy().astype(np.float64))
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    assert ours.sigmas[0] == 1.0 and ours.sigmas[-1] == 0.0
    errs = _run_pair(torch, ref, timesteps, ours, ToyModel())
    assert max(errs) < STATE_TOL, errs


@pytest.mark.parametrize("name", ("euler", "unipc"))
def test_solvers_land_on_x0_for_exact_velocity(name):
    # With the true velocity of a straight path to x0, every x0 prediction is x0 exactly,
    # so both solvers must end on it (final sigma is 0), for any sample shape.
    x0 = mx.array(_noise(5, (3, 2, 4, 5)))
    solver = make_solver(name, 7, 5.0)
    x = mx.array(_noise(6, (3, 2, 4, 5)))
    for k in range(len(solver)):
        s = float(solver.sigmas[k])
        x = solver.step((x - x0) / s, x)
    assert solver.step_index == 7
    np.testing.assert_allclose(np.array(x), np.array(x0), atol=1e-5)


def test_solver_state_and_errors():
    solver = FlowUniPCSolver(2, 5.0)
    x = mx.zeros((2, 3))
    x = solver.step(mx.ones((2, 3)), x)
    with pytest.raises(S2DiTError):
        solver.step(mx.ones((3, 2)), x)  # shape mismatch
    x = solver.step(mx.ones((2, 3)), x)
    with pytest.raises(S2DiTError):
        solver.step(mx.ones((2, 3)), x)  # past the end
    solver.reset()
    assert solver.step_index == 0
    out = solver.step(mx.ones((2, 3), dtype=mx.bfloat16), mx.zeros((2, 3), dtype=mx.bfloat16))
    assert out.dtype == mx.bfloat16
    with pytest.raises(S2DiTError):
        make_solver("ddim", 10, 5.0)
    for bad in ((0, 5.0), (10, 0.0), (10, float("nan")), (2.5, 5.0)):
        with pytest.raises(S2DiTError):
            make_solver("euler", *bad)
    assert isinstance(make_solver("UniPC", 4, 3.0), FlowUniPCSolver)


def test_few_step_timesteps():
    assert few_step_timesteps(4, 5.0) == pytest.approx(
        [1000.0, 937.5, 2500.0 / 3.0, 625.0], abs=1e-9
    )
    assert few_step_timesteps(4, 1.0) == pytest.approx([1000.0, 750.0, 500.0, 250.0], abs=1e-9)
    assert few_step_timesteps() == few_step_timesteps(4, 5.0)


def test_shift_and_add_noise_match_diffusers(torch):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    # diffusers' training grid: t = 1000..1, sigma = shift(t / 1000).
    grid = np.arange(1000, 0, -1, dtype=np.float64) / 1000.0
    np.testing.assert_allclose(shift_sigmas(grid, 5.0), sched.sigmas.numpy(), rtol=0, atol=1e-6)

    sched.set_timesteps(6)
    x0, noise = _noise(7), _noise(8)
    for t in sched.timesteps:
        want = sched.scale_noise(torch.from_numpy(x0), t[None], torch.from_numpy(noise)).numpy()
        got = add_noise(mx.array(x0), mx.array(noise), float(t))
        np.testing.assert_allclose(np.array(got), want, rtol=0, atol=1e-6)


def test_add_noise_per_sample_and_per_frame():
    x0, noise = _noise(9, (2, 3, 4, C)), _noise(10, (2, 3, 4, C))
    t = np.array([[1000.0, 500.0, 0.0], [250.0, 937.5, 10.0]], dtype=np.float32)
    s = (t / 1000.0)[:, :, None, None]
    got = add_noise(mx.array(x0), mx.array(noise), mx.array(t))
    np.testing.assert_allclose(np.array(got), (1 - s) * x0 + s * noise, atol=1e-6)
    got = add_noise(mx.array(x0), mx.array(noise), mx.array(t[:, 0]))
    s = (t[:, 0] / 1000.0)[:, None, None, None]
    np.testing.assert_allclose(np.array(got), (1 - s) * x0 + s * noise, atol=1e-6)


def test_cfg():
    c, u = mx.array([1.0, 2.0]), mx.array([0.5, -1.0])
    np.testing.assert_allclose(np.array(cfg(c, u, 5.0)), [3.0, 14.0])
    np.testing.assert_allclose(np.array(cfg(c, u, 1.0)), [1.0, 2.0])


def test_negative_prompt_is_wans():
    # Read the literal from the config source: executing it would need easydict and torch.
    path = _wan_dir() / "configs" / "shared_config.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]).endswith(
            "sample_neg_prompt"
        ):
            assert WAN_NEGATIVE_PROMPT == ast.literal_eval(node.value)
            return
    pytest.fail("sample_neg_prompt not found in wan/configs/shared_config.py")
