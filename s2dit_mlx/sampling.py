"""Flow-matching schedules and solvers: timestep shift, Euler, UniPC, few-step, CFG.

Convention (Wan / rectified flow): x_s = (1 - s) * x0 + s * noise with s in [0, 1], the model
is called with t = 1000 * s and predicts the velocity v = noise - x0, so x0 = x_s - s * v.

Schedules are plain numpy (float64 maths, float32 sigmas as Wan stores them); the solver state
lives in mx arrays of any shape, so the same solver drives channels-first or channels-last
latents, batched or not.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .errors import S2DiTError

# Wan's default negative prompt (wan/configs/shared_config.py, `sample_neg_prompt`), verbatim.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)

SOLVERS = ("euler", "unipc")
# The sampler of distilled few-step students: predict x0, re-noise it with fresh noise to the
# next level (streaming mode only; streaming.stream_latent_chunks).
FEW_STEP = "few-step"
SAMPLERS = (*SOLVERS, FEW_STEP)  # every --solver choice
# Noise-level grids of the UniPC solver: Wan's FlowUniPC, or diffusers' UniPCMultistepScheduler.
UNIPC_SCHEDULES = ("wan", "diffusers")


def shift_sigmas(sigmas, shift: float):
    """Warp noise levels towards 1: s' = shift * s / (1 + (shift - 1) * s)."""
    # Same operation order as Wan, so float64 results (and int-truncated timesteps) agree bitwise.
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def few_step_timesteps(steps: int = 4, shift: float = 5.0) -> list[float]:
    """Few-step schedule of distilled students: linspace(1000, 0, steps + 1)[:-1], shifted."""
    _check_schedule_args(steps, shift)
    s = np.linspace(1.0, 0.0, steps + 1)[:-1]
    return [float(t) for t in 1000.0 * shift_sigmas(s, shift)]


def add_noise(x0: mx.array, noise: mx.array, t) -> mx.array:
    """Forward flow (1 - s) * x0 + s * noise with s = t / 1000; t scalar, [B] or [B, T]."""
    s = mx.array(t, dtype=mx.float32) / 1000.0
    # A per-sample (or per-frame) t indexes the leading axes; broadcast over the rest.
    s = s.reshape(s.shape + (1,) * (x0.ndim - s.ndim)).astype(x0.dtype)
    return (1 - s) * x0 + s * noise


def cfg(v_cond: mx.array, v_uncond: mx.array, guidance: float) -> mx.array:
    """Classifier-free guidance: v_uncond + guidance * (v_cond - v_uncond)."""
    return v_uncond + guidance * (v_cond - v_uncond)


def _check_schedule_args(num_steps, shift, num_train_timesteps: int = 1000) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise S2DiTError(f"number of sampling steps must be a positive integer, got {num_steps!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise S2DiTError(f"timestep shift must be a positive number, got {shift!r}")
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise S2DiTError(
            f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}"
        )


def _upcast(x: mx.array) -> mx.array:
    # Half-precision latents are integrated in float32 and cast back on the way out.
    return x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x


class _FlowSolver:
    """Shared bookkeeping: the schedule, a step counter and shape checks."""

    timesteps: np.ndarray  # [num_steps] float64, the t the model is called with (0..1000)
    sigmas: np.ndarray  # [num_steps + 1] float32, noise levels; the last one is 0

    def __init__(self, num_steps: int, shift: float, num_train_timesteps: int = 1000):
        _check_schedule_args(num_steps, shift, num_train_timesteps)
        self.num_steps = num_steps
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps
        self._step = 0

    def __len__(self) -> int:
        return self.num_steps

    @property
    def step_index(self) -> int:
        """How many steps have been taken since construction or reset()."""
        return self._step

    def reset(self) -> None:
        """Forget the multistep history and start the schedule again."""
        self._step = 0

    def _begin_step(self, v: mx.array, sample: mx.array) -> int:
        if self._step >= self.num_steps:
            raise S2DiTError(f"solver already took all {self.num_steps} steps; call reset()")
        if v.shape != sample.shape:
            raise S2DiTError(f"model output shape {v.shape} != sample shape {sample.shape}")
        return self._step

    def _set_schedule(self, sigmas_f64: np.ndarray) -> None:
        # Wan truncates 1000 * sigma to int64 for the model and keeps float32 sigmas for the solver.
        self.timesteps = np.trunc(sigmas_f64 * self.num_train_timesteps).astype(np.float64)
        self.sigmas = np.concatenate([sigmas_f64, [0.0]]).astype(np.float32)


class FlowEulerSolver(_FlowSolver):
    """First-order flow solver x_{i+1} = x_i + (s_{i+1} - s_i) * v.

    Schedule: Wan's own (wan/utils/fm_solvers.py `get_sampling_sigmas` fed to
    `retrieve_timesteps`, as its "dpm++" path does): sigmas = shift(linspace(1, 0, n + 1)[:n])
    with a final 0, model timesteps = int(1000 * sigma). This is the first-order member of
    Wan's FlowDPMSolverMultistepScheduler (DPM-Solver-1 on a linear flow is exactly Euler).
    It is not diffusers' FlowMatchEulerDiscreteScheduler(shift=...).set_timesteps schedule,
    which spaces n points from 1 down to its already-shifted sigma_min and shifts them again
    (for 10 steps at shift 5 it ends at sigma 0.024, Wan's at 0.357).
    """

    def __init__(self, num_steps: int, shift: float, num_train_timesteps: int = 1000):
        super().__init__(num_steps, shift, num_train_timesteps)
        s = np.linspace(1.0, 0.0, num_steps + 1)[:num_steps]
        self._set_schedule(shift_sigmas(s, self.shift))

    def step(self, v: mx.array, sample: mx.array) -> mx.array:
        """Advance one step from sigmas[i] to sigmas[i + 1] given v = model(sample, timesteps[i])."""
        i = self._begin_step(v, sample)
        s0, s1 = float(self.sigmas[i]), float(self.sigmas[i + 1])
        out = _upcast(sample) + (s1 - s0) * _upcast(v)
        self._step += 1
        return out.astype(sample.dtype)


class FlowUniPCSolver(_FlowSolver):
    """UniPC multistep (UniP predictor + UniC corrector, B(h) = expm1, data prediction).

    Reproduces Wan's FlowUniPCMultistepScheduler as wan/text2video.py uses it: built with
    shift=1, then set_timesteps(num_steps, shift=shift); solver_order 2, "bh2",
    lower_order_final, corrector on from the second step. Its schedule starts at
    shift(1 - 1/num_train_timesteps), not at 1, and ends at sigma = 0 (lambda = +inf), where
    the last (first-order) predictor returns the x0 prediction itself.

    Step i: x0_i = x_i - s_i * v_i; correct x_i with x0_i (UniC, using the order of the
    previous predictor); then predict x_{i+1} from the corrected x_i and the last `order`
    x0 predictions (UniP). Scalar coefficients are computed in float64 numpy.

    `schedule="diffusers"` swaps in the noise levels of diffusers' UniPCMultistepScheduler
    as diffusers' WanPipeline configures it (use_flow_sigmas, flow_shift=shift):
    shift(linspace(1, 1/N, n + 1)[:n]) with a first sigma of 1 nudged to 1 - 1e-6. The
    update rule is the same; the noise levels differ from Wan's by up to ~0.007.
    """

    def __init__(
        self,
        num_steps: int,
        shift: float,
        num_train_timesteps: int = 1000,
        solver_order: int = 2,
        schedule: str = "wan",
    ):
        super().__init__(num_steps, shift, num_train_timesteps)
        if not isinstance(solver_order, int) or solver_order < 1:
            raise S2DiTError(f"UniPC solver_order must be a positive integer, got {solver_order!r}")
        if schedule not in UNIPC_SCHEDULES:
            raise S2DiTError(
                f"unknown UniPC schedule {schedule!r}; choose one of: {', '.join(UNIPC_SCHEDULES)}"
            )
        self.solver_order = solver_order
        self.schedule = schedule
        if schedule == "wan":
            # Wan's training grid tops out at 1 - 1/N (float32); the inference grid starts there.
            sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
            sigmas = shift_sigmas(np.linspace(sigma_max, 0.0, num_steps + 1)[:-1], self.shift)
        else:
            # diffusers spaces n points from 1 to 1/N, and keeps lambda finite at sigma = 1.
            s = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
            sigmas = shift_sigmas(s, self.shift)
            if abs(sigmas[0] - 1.0) < 1e-6:
                sigmas[0] -= 1e-6
        self._set_schedule(sigmas)
        sig = self.sigmas.astype(np.float64)
        with np.errstate(divide="ignore"):
            # lambda = log(alpha / sigma), alpha = 1 - sigma; +inf at the final sigma = 0.
            self._lambdas = np.log(1.0 - sig) - np.log(sig)
        self.reset()

    def reset(self) -> None:
        """Forget the multistep history and start the schedule again."""
        super().reset()
        self._x0s: list[mx.array] = []  # most recent last, at most solver_order entries
        self._last_sample: mx.array | None = None  # the sample the last predictor started from
        self._last_order = 0

    def _uni_update(self, x, base: int, target: int, x0s: list, m_t=None) -> mx.array:
        """Move x from sigmas[base] to sigmas[target] using x0 predictions x0s (newest last).

        Predictor (UniP) when m_t is None, else corrector (UniC) with m_t, the x0 predicted at
        `target`. The order is len(x0s).
        """
        lam = self._lambdas
        sig_t, sig_0 = float(self.sigmas[target]), float(self.sigmas[base])
        alpha_t = 1.0 - sig_t
        h = float(lam[target] - lam[base])
        order = len(x0s)
        # rk: where each older x0 sits relative to base, in units of h (negative: behind us).
        rks = [float(lam[base - k] - lam[base]) / h for k in range(1, order)]

        hh = -h  # data-prediction form
        h_phi_1 = math.expm1(hh)
        b_h = h_phi_1  # "bh2": B(h) = e^hh - 1
        r = np.stack([np.power(np.asarray(rks + [1.0]), k) for k in range(order)])
        b = np.empty(order)
        h_phi_k, fact = h_phi_1 / hh - 1.0, 1.0
        for k in range(1, order + 1):
            b[k - 1] = h_phi_k * fact / b_h
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / fact

        if m_t is not None:  # UniC solves the full system; order 1 uses the simplified 1/2
            rhos = [0.5] if order == 1 else np.linalg.solve(r, b).tolist()
        elif order == 1:
            rhos = []
        else:  # UniP drops the newest point; order 2 uses the simplified 1/2
            rhos = [0.5] if order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1]).tolist()

        m0 = x0s[-1]
        out = (sig_t / sig_0) * x - (alpha_t * h_phi_1) * m0
        terms = [(rhos[k] / rk) * (x0s[-(k + 2)] - m0) for k, rk in enumerate(rks)]
        if m_t is not None:
            terms.append(rhos[-1] * (m_t - m0))
        if terms:
            out = out - (alpha_t * b_h) * sum(terms[1:], terms[0])
        return out

    def step(self, v: mx.array, sample: mx.array) -> mx.array:
        """One UniPC step given v = model(sample, timesteps[i]); returns the sample at sigmas[i+1]."""
        i = self._begin_step(v, sample)
        x = _upcast(sample)
        x0 = x - float(self.sigmas[i]) * _upcast(v)

        if self._last_sample is not None:
            # UniC: redo the previous step with the new x0 as an extra point.
            hist = self._x0s[-self._last_order :]
            x = self._uni_update(self._last_sample, i - 1, i, hist, m_t=x0)

        self._x0s = (self._x0s + [x0])[-self.solver_order :]
        # lower_order_final: the order never reaches past the end of the schedule; warm-up:
        # never more points than we have.
        order = min(self.solver_order, self.num_steps - i, len(self._x0s))
        self._last_sample, self._last_order = x, order

        if float(self.sigmas[i + 1]) == 0.0:
            out = x0  # order 1 at sigma = 0 lands exactly on the x0 prediction
        else:
            out = self._uni_update(x, i, i + 1, self._x0s[-order:])
        self._step += 1
        return out.astype(sample.dtype)


def make_solver(
    name: str,
    num_steps: int,
    shift: float,
    num_train_timesteps: int = 1000,
    schedule: str = "wan",
) -> FlowEulerSolver | FlowUniPCSolver:
    """Build a solver by name: "euler" or "unipc" (schedule "wan" or "diffusers", UniPC only)."""
    key = str(name).lower()
    if key == "euler":
        if schedule != "wan":
            raise S2DiTError(f"the Euler solver has only Wan's schedule, not {schedule!r}")
        return FlowEulerSolver(num_steps, shift, num_train_timesteps)
    if key == "unipc":
        return FlowUniPCSolver(num_steps, shift, num_train_timesteps, schedule=schedule)
    raise S2DiTError(f"unknown solver {name!r}; choose one of: {', '.join(SOLVERS)}")
