"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models", Algorithm 2): a student learns in one DDIM step what its teacher does in two, and the step count
halves stage by stage (N_0 -> N_0/2 -> ... -> N_0/2^K), each stage's student becoming the next teacher.

The student of N steps is trained on exactly the grid it is sampled with,
``diffjax.sample(..., method="ddim", grid="trailing", num_steps=N, t_end=0)``: the N + 1 times
t_k = T (1 - k/N), k = 0..N, from T = ``schedule.t_max`` down to t_N = 0 (the last interval is the step to
x_0). Training draws k ~ U{0..N-1}, i.e. t = t_k; the teacher takes two DDIM steps t -> t' -> t'' on its own
2N-step trailing grid (t' = t_{2k+1}, t'' = t_{2k+2} of that grid: t - T/(2N) and t - T/N), and the
student's x_0 prediction at t is regressed on the x~ whose one DDIM step t -> t'' lands on the teacher's
result. The step count N is a traced integer computed from the train step, so one compiled train step
serves every stage.

Pure functions of arrays and ``Denoiser`` s; ``diffjax.training.task_progressive`` binds them to a config.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from diffjax.parameterization import Denoiser, make_denoiser, to_x0_eps
from diffjax.samplers.ancestral import ddim_step
from diffjax.schedules import Schedule, broadcast_time

__all__ = ["WEIGHTINGS", "check_stages", "trailing_time", "student_steps", "trained_steps", "sample_student_times",
           "teacher_two_steps", "target_x0", "distillation_target", "loss_weight", "make_progressive_loss",
           "next_teacher"]

# weights w(t) on ||x0_hat - x~||^2 (Salimans & Ho 2022 sec. 4): "truncated_snr" = max(SNR, 1), their default
# ("x-MSE with truncated SNR"); "snr_plus_one" = SNR + 1, the v-MSE ||v_hat - v~||^2 on a variance-preserving
# schedule (alpha^2 + sigma^2 = 1)
WEIGHTINGS = ("truncated_snr", "snr_plus_one")


def check_stages(teacher_steps: int, steps_per_stage: int, num_stages: int) -> None:
    """ValueError naming the argument unless all are integers >= 1 and N_0 is a power of 2 >= 2^K (the last
    student takes N_0 / 2^K >= 1 steps)."""
    for name, v in (("teacher_steps", teacher_steps), ("steps_per_stage", steps_per_stage),
                    ("num_stages", num_stages)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
    if teacher_steps & (teacher_steps - 1) or teacher_steps < 2**num_stages:
        raise ValueError(f"teacher_steps must be a power of 2 >= 2 ** num_stages = {2**num_stages} (each stage "
                         f"halves the steps); got {teacher_steps}")


def trailing_time(k, num_steps, t_max: float):
    """Time k of the ``num_steps``-step "trailing" grid, t_k = T (1 - k / N): the grid ``diffjax.sample``
    lays with ``grid="trailing", t_end=0`` (``jnp.linspace(T, 0, N + 1)``, computed the same way in float)."""
    dtype = jnp.result_type(float)
    return t_max * (1 - jnp.asarray(k, dtype) / jnp.asarray(num_steps, dtype))


def student_steps(step, teacher_steps: int, steps_per_stage: int, num_stages: int):
    """The student's step count N = N_0 / 2^(k+1) in the update after ``step`` updates (stage k =
    min(step // steps_per_stage, num_stages - 1)); ``step`` may be traced (int32 result)."""
    stage = jnp.minimum(jnp.asarray(step, jnp.int32) // steps_per_stage, num_stages - 1)
    return jnp.right_shift(jnp.int32(teacher_steps), stage + 1)


def trained_steps(step: int, teacher_steps: int, steps_per_stage: int, num_stages: int) -> int:
    """The steps the parameters after ``step`` updates sample with: N_0 / 2^min(ceil(step / steps_per_stage), K)
    (step 0: the teacher's N_0; the end of stage k, step (k + 1) steps_per_stage: its student's N_0 / 2^(k+1))."""
    stage_ends = min(-(-int(step) // steps_per_stage), num_stages)
    return teacher_steps >> stage_ends


def sample_student_times(key, n: int, num_steps, t_max: float):
    """(t, t', t'') of shape (n,) each: t = t_k, k ~ U{0..N-1} on the N-step trailing grid, and the teacher's
    two steps t' = t - T/(2N), t'' = t - T/N on its 2N-step grid (Algorithm 2, t = i/N, i ~ U{1..N})."""
    k = jax.random.randint(key, (n,), 0, num_steps)
    return (trailing_time(k, num_steps, t_max), trailing_time(2 * k + 1, 2 * num_steps, t_max),
            trailing_time(k + 1, num_steps, t_max))


def teacher_two_steps(teacher: Denoiser, x_t, t, t_mid, t_end, cond=None):
    """The teacher's two DDIM steps x_t -> x_t' -> x_t'' (Algorithm 2; DDIM, Song et al. 2021 eq. 12 with eta = 0)."""
    schedule = teacher.schedule
    x_mid = ddim_step(schedule, teacher(x_t, t, cond), broadcast_time(t_mid, x_t), broadcast_time(t, x_t))
    return ddim_step(schedule, teacher(x_mid, t_mid, cond), broadcast_time(t_end, x_t),
                     broadcast_time(t_mid, x_t))


def target_x0(schedule: Schedule, x_t, t, x_s, s):
    """The x_0 whose one DDIM step t -> s lands on x_s (Algorithm 2):
    x~ = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t).

    The denominator is written -alpha_s expm1(lambda_t - lambda_s) (no cancellation as s -> t); where
    sigma_s = 0 (s = 0 on a VP schedule: lambda_s = inf) it is alpha_s and x~ = x_s / alpha_s.
    """
    t, s = broadcast_time(t, x_t), broadcast_time(s, x_t)
    ratio = schedule.sigma(s) / schedule.sigma(t)
    return (x_s - ratio * x_t) / (-schedule.alpha(s) * jnp.expm1(schedule.log_snr(t) - schedule.log_snr(s)))


def distillation_target(teacher: Denoiser, x_t, t, t_mid, t_end, cond=None):
    """x~ of Algorithm 2: ``target_x0`` of the teacher's two DDIM steps t -> t' -> t'' (gradient stopped)."""
    x_end = teacher_two_steps(teacher, x_t, t, t_mid, t_end, cond)
    return jax.lax.stop_gradient(target_x0(teacher.schedule, x_t, t, x_end, t_end))


def loss_weight(schedule: Schedule, t, weighting: str):
    """w(t) on ||x0_hat - x~||^2 (Salimans & Ho 2022 sec. 4): max(SNR, 1) or SNR + 1, SNR = exp(2 lambda_t)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    two_lam = 2.0 * schedule.log_snr(t)
    return jnp.exp(jnp.maximum(two_lam, 0.0)) if weighting == "truncated_snr" else 1.0 + jnp.exp(two_lam)


def make_progressive_loss(student_fn: Callable, teacher_fn: Callable, schedule: Schedule, *, prediction: str,
                          teacher_steps: int, steps_per_stage: int, num_stages: int,
                          weighting: str = "truncated_snr") -> Callable:
    """``loss_fn(params, teacher_params, batch, key, step) -> (loss, aux)`` of Algorithm 2.

    ``student_fn(params, x, t, cond)`` (training mode) and ``teacher_fn(teacher_params, x, t, cond)`` (eval
    mode) predict ``prediction``; ``batch``: {"x": (B, ...), optional "label": (B,)} (a label is the cond);
    ``step``: updates made so far (traced), which fixes N = ``student_steps(step, ...)``. loss: the batch mean
    of w(t) mean_dims (x0_hat - x~)^2; aux: per-example ``loss``, ``t`` and the student's ``num_steps``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    check_stages(teacher_steps, steps_per_stage, num_stages)
    t_max = float(schedule.t_max)

    def loss_fn(params, teacher_params, batch, key, step):
        x0, cond = batch["x"], batch.get("label")
        chex.assert_rank(x0, {2, 3, 4, 5})
        k_t, k_eps = jax.random.split(key)
        n = student_steps(step, teacher_steps, steps_per_stage, num_stages)
        t, t_mid, t_end = sample_student_times(k_t, x0.shape[0], n, t_max)
        x_t = schedule.marginal(x0, t, jax.random.normal(k_eps, x0.shape, x0.dtype))
        teacher = make_denoiser(jax.tree_util.Partial(teacher_fn, teacher_params), schedule, prediction)
        x_target = distillation_target(teacher, x_t, t, t_mid, t_end, cond)
        x_hat = to_x0_eps(student_fn(params, x_t, t, cond), prediction, x_t, t, schedule).x0
        chex.assert_equal_shape([x_hat, x_target])
        per_example = loss_weight(schedule, t, weighting) * jnp.mean(
            jnp.square(x_hat - x_target), axis=tuple(range(1, x0.ndim)))
        return jnp.mean(per_example), {"loss": per_example, "t": t, "num_steps": n}

    return loss_fn


def next_teacher(step, teacher: Any, student: Any, steps_per_stage: int, num_stages: int):
    """The teacher after the update that brought the count to ``step``: the student at each stage end
    (Algorithm 2, "eta <- theta"; step = k steps_per_stage, 0 < k < num_stages), else ``teacher``; traced."""
    step = jnp.asarray(step, jnp.int32)
    swap = (step % steps_per_stage == 0) & (step > 0) & (step < num_stages * steps_per_stage)
    return jax.tree.map(lambda a, b: jnp.where(swap, b, a), teacher, student)
