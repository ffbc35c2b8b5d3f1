"""DMD with Self-Forcing rollout: zero gradient at the teacher, two-phase = autodiff, resume."""

from __future__ import annotations

import copy

import s2dit_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT
from s2dit_mlx.transfer import init_from
from train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from train.dmd import (
    DMD,
    DMDConfig,
    _noised,
    dmd_gradient,
    exit_steps,
    generator_grads,
    rollout,
)

WIDTHS = dict(
    in_dim=4, out_dim=4, dim=24, ffn_dim=40, freq_dim=16, text_dim=8, num_heads=2, text_len=6
)
POINTS = (1000.0, 750.0, 500.0)


def net(layers, seed, **kw) -> S2DiT:
    mx.random.seed(seed)
    m = S2DiT(ModelArgs(**{**WIDTHS, "frames_per_chunk": 2, **kw}, layers=layers))
    m.load_weights([(n, 0.5 * mx.random.normal(p.shape)) for n, p in tree_flatten(m.parameters())])
    mx.eval(m.parameters())
    return m


def contexts(indices):
    return mx.stack([mx.random.normal((4, 8), key=mx.random.key(100 + i)) for i in indices])


NEG = mx.random.normal((1, 4, 8), key=mx.random.key(7))


def config(**kw) -> DMDConfig:
    base = dict(points=POINTS, frames=5, latent_height=4, latent_width=4, iterations=4,
                batch_size=2, guidance=1.0, lr_generator=1e-3, lr_critic=1e-3, score_chunk_frames=2)  # fmt: skip
    return DMDConfig(**{**base, **kw})


def flat(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_generator_equal_to_critic_and_teacher_gets_exactly_zero_gradient():
    teacher = net(["full", "full"], seed=0, window=None)
    generator, critic = net(["full", "full"], seed=1), net(["full", "full"], seed=2)
    init_from(generator, teacher, "first")
    init_from(critic, teacher, "first")
    run = DMD(generator, teacher, critic, contexts, NEG, config())
    before = flat(generator)
    stats = run.iteration()  # iteration 0: the generator's turn
    assert stats["dmd_loss"] == 0.0 and stats["generator_grad_norm"] == 0.0
    after = flat(generator)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # The test can fail: a critic that differs from the teacher moves the generator.
    run2 = DMD(generator, teacher, net(["full", "full"], seed=3), contexts, NEG, config())
    assert run2.iteration()["generator_grad_norm"] > 0


def test_two_phase_gradient_equals_plain_autodiff():
    """Rollout without autodiff + one vjp per exit pass == mx.grad through the whole rollout."""
    cfg = config(guidance=2.5)
    teacher = net(["full", "full"], seed=0)
    critic = net(["full", "full"], seed=5)
    generator = net(["lcha", "ssa", "full"], seed=4, window=2, sink=1)
    step = 3
    context = contexts([0, 1])
    video, records = rollout(generator, context, cfg, step)
    assert len(records) == 3  # 5 frames in chunks of 2
    grad, _ = dmd_gradient(video, teacher, critic, context, NEG, cfg, step)
    two_phase = dict(tree_flatten(generator_grads(generator, records, context, grad / grad.size)))

    target = mx.stop_gradient(video - grad)
    exits = exit_steps(cfg.seed, step, 3, len(cfg.points))
    params = generator.trainable_parameters()

    def plain_loss(p):
        """The rollout again, differentiable through each exit pass only."""
        generator.update(p)
        from s2dit_mlx.generation import SeededNoise
        from train.dmd import _sample_keys

        noise = SeededNoise(keys=_sample_keys(cfg.seed, "noise", step, 2))
        cache, outs = generator.make_cache(), []
        for c, start in enumerate(range(0, 5, 2)):
            shape = (2, min(2, 5 - start), 4, 4, 4)
            x = noise.draw(shape)
            for i, t in enumerate(cfg.points):
                v = generator(mx.stop_gradient(x), mx.full((2,), t), context, cache=cache)
                x0 = x - (t / 1000.0) * v
                if i == exits[c]:
                    break
                s = cfg.points[i + 1] / 1000.0
                x = mx.stop_gradient((1.0 - s) * x0 + s * noise.draw(shape))
            outs.append(x0)
            generator(mx.stop_gradient(x0), mx.zeros((2,)), context, cache=cache, update_cache=True)
            cache.detach()
        out = mx.concatenate(outs, axis=1)
        return 0.5 * ((out - target) ** 2).mean()

    plain = dict(tree_flatten(mx.grad(plain_loss)(params)))
    generator.update(params)
    assert two_phase.keys() == plain.keys()
    scale = max(float(mx.abs(g).max()) for g in plain.values())
    worst = max(float(mx.abs(two_phase[k] - plain[k]).max()) for k in plain)
    assert scale > 1e-6
    print(f"two-phase vs autodiff: max abs diff {worst:.2e}, max |grad| {scale:.2e}")
    assert worst <= 1e-5 * max(scale, 1.0), (worst, scale)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    def fresh():
        teacher = net(["full", "full"], seed=0)
        generator = net(["lcha", "full"], seed=1, window=2)
        critic = copy.deepcopy(teacher)
        critic.unfreeze()
        return DMD(generator, teacher, critic, contexts, NEG, config(ema=0.9, critic_ratio=2))

    whole = fresh()
    for _ in range(4):
        whole.iteration()
    half = fresh()
    for _ in range(2):
        half.iteration()
    save_checkpoint(tmp_path, half.step, half.arrays(), half.state_dict())
    resumed = fresh()
    arrays, state = load_checkpoint(latest_checkpoint(tmp_path))
    resumed.load(arrays, state, "checkpoint")
    for _ in range(2):
        resumed.iteration()
    for a, b in ((whole.generator, resumed.generator), (whole.critic, resumed.critic)):
        fa, fb = flat(a), flat(b)
        assert all(np.array_equal(fa[k], fb[k]) for k in fa)
    assert all(np.array_equal(np.array(whole.ema[k]), np.array(resumed.ema[k])) for k in whole.ema)
    assert [h["critic_loss"] for h in whole.history] == [h["critic_loss"] for h in resumed.history]


def test_t_shift_moves_the_noise_levels_up_by_the_flow_shift():
    """--t-shift maps each drawn level u to shift u / (1 + (shift - 1) u) before [t_min, t_max];
    shift 1 is the uniform draw, and a bad shift is refused."""
    video = mx.random.normal((64, 2, 4, 4, 4), key=mx.random.key(3))
    t1, x1, e1 = _noised(video, config(batch_size=64), "dmd", 5)
    t3, x3, e3 = _noised(video, config(batch_size=64, t_shift=3.0), "dmd", 5)
    u = (np.array(t1) - 20.0) / 960.0
    np.testing.assert_allclose(np.array(t3), 20.0 + 960.0 * 3 * u / (1 + 2 * u), rtol=1e-5)
    np.testing.assert_array_equal(np.array(e1), np.array(e3))  # same noise, other levels
    s = (np.array(t3) / 1000.0).reshape(-1, 1, 1, 1, 1)
    np.testing.assert_allclose(
        np.array(x3), (1 - s) * np.array(video) + s * np.array(e3), atol=1e-5
    )
    assert np.mean(np.array(t3)) > np.mean(np.array(t1)) + 100
    with pytest.raises(S2DiTError, match="t_shift"):
        config(t_shift=0.0).validate()
