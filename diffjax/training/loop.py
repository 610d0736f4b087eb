"""The training loop and the end-of-run evaluation behind ``python -m diffjax.main``.

``train(config, workdir)`` restores the latest checkpoint in ``workdir`` if there is one (the
data iterator restarts at the restored step and the per-step keys are ``fold_in(key, step)``,
so a resumed run reproduces an uninterrupted one bit for bit), runs jitted steps, logs to
TensorBoard and ``loss_history.csv``, checkpoints periodically, on interruption (Ctrl-C or
SIGTERM) and at the end, and stops with ``NonFiniteError`` on a NaN/inf loss or gradient without
checkpointing it. Every ``training.log_every`` steps it prints a line (step, loss, steps/s) when the
progress bar is off; every ``training.sample_every`` / ``training.eval_every`` steps (0: never) it
writes a sample grid / the test NLL of the EMA weights. ``evaluate(...)`` samples with the EMA
weights and computes the test NLL at the end.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from diffjax import data as data_lib
from diffjax import models as models_lib
from diffjax.likelihood import evaluate_nll
from diffjax.samplers import sample
from diffjax.sharding import shard_batch, to_host
from diffjax.training.builders import (build_loss, build_model, build_optimizer, build_schedule, model_shape,
                                       validate_config)
from diffjax.training.checkpoint import Checkpointer, NonFiniteError
from diffjax.training.state import TrainState
from diffjax.training.tasks import get_task
from diffjax.training.step import global_batch, make_mesh, make_train_step, shard_state, state_shardings

__all__ = ["Run", "setup", "train", "evaluate", "evaluate_classifier", "train_and_evaluate", "ema_model_fn",
           "generate", "nll_per_dim"]


@dataclass
class Run:
    """Everything built from a config: reused by training, evaluation and ablation scripts."""

    config: Any
    spec: Any
    module: Any
    schedule: Any
    mesh: Any
    shardings: Any
    state: TrainState
    checkpointer: Optional[Checkpointer]
    # model_fn(params, x, t, cond) in eval mode (TaskSpec.eval_apply of the network), one object per run (compiled
    # loops reuse it)
    apply_eval: Any
    # one example as the network sees it and the sampler draws it (the data's shape, or e.g. latents')
    sample_shape: tuple = ()
    # decode(extra, y) -> x: the sampler's output to the data range (TaskSpec.decode); None: it is data
    decode: Optional[Any] = None


def setup(config, workdir: Optional[str] = None, restore: bool = True, step: Optional[int] = None,
          read_only: bool = False, structure_only: bool = False) -> Run:
    """Validate the config, build model/schedule/state on the mesh and restore checkpoint ``step`` (default:
    the latest); ``read_only``: the workdir's checkpoints are only read (``Checkpointer``);
    ``structure_only``: the caller restores a checkpoint over the state, so a task's teacher is not read."""
    validate_config(config, config.training.num_devices or jax.device_count())
    spec = data_lib.get_spec(config.data.dataset)
    module = build_model(config)
    schedule = build_schedule(config.diffusion)
    mesh = make_mesh(config.training.mesh.to_dict(), config.training.num_devices)
    ckpt = None
    if workdir is not None:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.training.max_to_keep, read_only=read_only)
    restoring = ckpt is not None and restore and (step is not None or ckpt.latest_step() is not None)
    k_init, k_run = jax.random.split(jax.random.PRNGKey(config.seed))
    task = get_task(config.get("task", "diffusion"))
    shape = model_shape(config)
    params = (task.init_params or models_lib.init_params)(module, k_init, (1, *shape))
    extra = None
    if task.init is not None:
        params, extra = task.init(config, schedule, module, params, restore_only=restoring or structure_only)
    state = TrainState.create(params, build_optimizer(config), k_run, extra)
    shardings = state_shardings(state, mesh, config.training.fsdp_min_size)
    state = shard_state(state, shardings)
    if restoring:
        state = ckpt.restore(state, step)
    apply_eval = models_lib.make_model_fn(module, train=False)
    if task.eval_apply is not None:
        apply_eval = task.eval_apply(config, schedule, apply_eval)
    decode = None if task.decode is None else task.decode(config)
    return Run(config, spec, module, schedule, mesh, shardings, state, ckpt, apply_eval, shape, decode)


class _StopRequested:
    """SIGTERM (pre-emption) stops the loop at a step boundary, where it checkpoints and returns.

    One process: a Python signal handler sets a flag. Several processes: JAX's pre-emption sync
    manager (installed by ``jax.distributed.initialize``) owns SIGTERM, and
    ``reached_preemption_sync_point(step)`` turns true at the *same* step on every process, so all
    of them save the same step and none is left waiting in a collective.
    """

    def __init__(self):
        self.requested = False
        self._old = None
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if not self._multi:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread
                self._old = None
        return self

    def check(self, step: int) -> bool:
        if self._multi and not self.requested:
            from jax.experimental import multihost_utils

            self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class _TimeBudget:
    """``training.max_train_seconds``: stop once this much wall time (compilation included) has passed
    since ``train`` began, for equal-compute comparisons. One process decides at every step; several
    decide at ``log_every`` boundaries on process 0's clock (broadcast), so all stop at the same step."""

    def __init__(self, seconds: Optional[float], every: int):
        if seconds is not None and not seconds > 0:
            raise ValueError(f"config.training.max_train_seconds must be > 0 or None; got {seconds!r}")
        self.seconds, self.every, self.stopped = seconds, every, False
        self.start = time.perf_counter()

    def spent(self, step: int, state) -> bool:
        """``state``: the latest train state; waited for before reading the clock, so that asynchronous
        dispatch (up to ``log_every`` steps ahead) cannot carry training past the budget."""
        if self.seconds is None:
            return False
        multi = jax.process_count() > 1
        if multi and step % self.every:
            return False
        jax.block_until_ready(state.step)
        over = time.perf_counter() - self.start >= self.seconds
        if multi:
            from jax.experimental import multihost_utils

            over = bool(multihost_utils.broadcast_one_to_all(np.asarray(over)))
        self.stopped = over
        return over


def _check_finite(metrics: dict, first_step: int):
    """Raise NonFiniteError naming the first step whose loss or gradient norm is NaN/inf."""
    bad = ~(np.isfinite(metrics["loss"]) & np.isfinite(metrics["grad_norm"]))
    if bad.any():
        i = int(np.argmax(bad))
        raise NonFiniteError(f"non-finite loss {metrics['loss'][i]} / grad norm {metrics['grad_norm'][i]} "
                             f"at step {first_step + i + 1}; the last checkpoint is left untouched")


def train(config, workdir: str, *, run: Optional[Run] = None, progress: bool = True,
          stop_after: Optional[int] = None) -> tuple[Run, dict]:
    """Train to ``config.training.num_steps`` (or ``stop_after`` steps, for tests), resuming from ``workdir``.

    Returns the run (with the final state) and a summary: final_loss, steps_per_sec, steps run.
    """
    run = run or setup(config, workdir)
    t_cfg = config.training
    k = t_cfg.steps_per_call
    is_main = jax.process_index() == 0
    start = int(jax.device_get(run.state.step))
    end = t_cfg.num_steps if stop_after is None else min(t_cfg.num_steps, start + stop_after)
    step_fn = _train_step_for(run)
    batches = train_batches(config, start)

    writer = _summary_writer(workdir) if is_main else None
    history_path = os.path.join(workdir, "loss_history.csv")
    if is_main:
        _truncate_history(history_path, start)
        _truncate_history(os.path.join(workdir, "eval_history.csv"), start)
    bar = _progress(start, end, disable=not (progress and is_main))
    log_line = is_main and not progress
    state, pending, last_loss = run.state, [], float("nan")
    step, timed_steps, timed_secs, t_last, s_last = start, 0, 0.0, None, start
    budget = _TimeBudget(t_cfg.get("max_train_seconds"), t_cfg.log_every)
    try:
        with _StopRequested() as stop:
            while step < end and not stop.check(step) and not budget.spent(step, state):
                chunk = [next(batches) for _ in range(k)]
                host = chunk[0] if k == 1 else jax.tree.map(lambda *xs: np.stack(xs), *chunk)
                state, metrics = step_fn(state, global_batch(host, run.mesh, stacked=k > 1))
                pending.append((step, metrics))
                step += k
                if step % t_cfg.log_every == 0 or step == end:
                    jax.block_until_ready(state.step)
                    now = time.perf_counter()
                    if t_last is not None:  # the first interval includes compilation: not timed
                        timed_steps += step - s_last
                        timed_secs += now - t_last
                    t_last, s_last = now, step
                    last_loss = _flush(pending, writer, history_path, bar, timed_steps, timed_secs, log_line)
                    pending = []
                if step % t_cfg.checkpoint_every == 0 and run.checkpointer is not None:
                    last_loss = _flush(pending, writer, history_path, bar, timed_steps, timed_secs, log_line) \
                        if pending else last_loss
                    pending = []
                    run.checkpointer.save(state, config=config)
                if _due(step, t_cfg.get("sample_every", 0)) or _due(step, t_cfg.get("eval_every", 0)):
                    run.state = state  # the EMA weights of this step; the next step donates them only later
                    _evaluate_during_training(run, workdir, step, writer)
    except KeyboardInterrupt:
        _save_if_clean(run, state, pending)
        raise
    if pending:
        last_loss = _flush(pending, writer, history_path, bar, timed_steps, timed_secs, log_line)
    if step == start:  # nothing left to train (e.g. restarted after the last step): the loss logged for it
        last_loss = _logged_loss(history_path, step)
    if run.checkpointer is not None:
        run.checkpointer.save(state, config=config)
    bar.close()
    if writer is not None:
        writer.flush()
    run.state = state
    steps_per_sec = timed_steps / timed_secs if timed_secs > 0 else float("nan")
    if stop.requested:
        logging.warning("SIGTERM: checkpointed step %d and stopped", step)
    if budget.stopped:
        logging.warning("training.max_train_seconds=%s reached: stopped at step %d", budget.seconds, step)
    return run, {"final_loss": last_loss, "steps_per_sec": steps_per_sec, "steps": step - start,
                 "step": step, "start_step": start, "preempted": stop.requested, "budget_stopped": budget.stopped,
                 "loop_seconds": time.perf_counter() - budget.start}


def train_batches(config, start_step: int):
    """This process's host batches from ``start_step`` on: the task's own data (e.g. reflow's couplings) or
    ``config.data.dataset``."""
    task = get_task(config.get("task", "diffusion"))
    if task.batches is not None:
        return task.batches(config, start_step, jax.process_index(), jax.process_count())
    return data_lib.train_batches(
        config.data.dataset, global_batch_size=config.training.batch_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        dequantize=config.data.dequantize, random_flip=config.data.random_flip, data_dir=config.data.data_dir)


_STEP_CACHE: dict = {}
# config sections that cannot change a train step's program (the fields of training it reads are keyed below)
_NOT_IN_STEP = ("training", "eval", "sample", "distributed", "data", "seed")


def _train_step_for(run: Run):
    """The jitted step for this run's config, shared by runs whose step is the same (resumes, tests, sweeps)."""
    c = run.config
    # build_loss is part of the key so a replaced loss builder (tests patch one in) never reuses a step
    # every other section (model, diffusion, optim and any task's own, e.g. config.progressive) is part of the key
    key = (json.dumps({k: v for k, v in c.to_dict().items() if k not in _NOT_IN_STEP}, sort_keys=True, default=str),
           c.get("task", "diffusion"),
           c.data.dataset, c.training.steps_per_call, c.training.get("grad_accum_steps", 1),
           c.training.fsdp_min_size, run.mesh, build_loss)
    if key not in _STEP_CACHE:
        loss_fn = build_loss(c, run.schedule, run.module)
        _STEP_CACHE[key] = make_train_step(loss_fn, build_optimizer(c), ema_decay=c.optim.ema_decay,
                                           ema_warmup=c.optim.get("ema_warmup", False),
                                           shardings=run.shardings, mesh=run.mesh,
                                           steps_per_call=c.training.steps_per_call,
                                           grad_accum_steps=c.training.get("grad_accum_steps", 1))
    return _STEP_CACHE[key]


def _save_if_clean(run: Run, state, pending):
    """On Ctrl-C: checkpoint the state reached so far if every step since the last check was finite.

    The interrupt is re-raised by the caller either way; a state that cannot be saved is reported
    (the previous checkpoint stays the latest), never written.
    """
    if run.checkpointer is None:
        return
    try:
        for first, m in pending:
            _check_finite(jax.device_get(m), first)
        step = run.checkpointer.save(state, config=run.config)
        logging.warning("interrupted: checkpointed step %d", step)
    except (NonFiniteError, RuntimeError) as e:
        logging.warning("interrupted: not checkpointed (%s); latest checkpoint is step %s",
                        e, run.checkpointer.latest_step())


def _truncate_history(path: str, step: int):
    """Drop rows past the restored step (logged before a crash), so a resumed run's CSV has each step once."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) != len(rows):
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, path)


def _logged_loss(history_path: str, step: int) -> float:
    """The loss ``loss_history.csv`` holds for ``step`` (NaN if none)."""
    if not os.path.exists(history_path):
        return float("nan")
    with open(history_path, newline="") as f:
        losses = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}
    return losses.get(step, float("nan"))


def _flush(pending, writer, history_path, bar, timed_steps, timed_secs, log_line=False) -> float:
    """Fetch pending metrics, check them, append to the CSV / TensorBoard, update the bar; with
    ``log_line``, print the step, the mean loss since the last line and the steps/s."""
    rows = []
    for first, m in pending:
        m = jax.device_get(m)
        _check_finite(m, first)
        for i in range(len(m["loss"])):
            rows.append((first + i + 1, float(m["loss"][i]), float(m["grad_norm"][i])))
    rate = timed_steps / timed_secs if timed_secs > 0 else float("nan")
    if jax.process_index() == 0:
        new = not os.path.exists(history_path)
        with open(history_path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "loss", "grad_norm"])
            w.writerows(rows)
        if writer is not None:
            for s, loss, gn in rows:
                writer.add_scalar("train/loss", loss, s)
                writer.add_scalar("train/grad_norm", gn, s)
            if math.isfinite(rate):
                writer.add_scalar("train/steps_per_sec", rate, rows[-1][0])
    bar.update(rows[-1][0] - bar.n)
    window = [r[1] for r in rows]
    bar.set_postfix(loss=f"{np.mean(window):.4f}", steps_per_s=f"{rate:.2f}")
    if log_line:
        speed = f"{rate:.2f} steps/s" if math.isfinite(rate) else "steps/s from the next line (this one compiled)"
        print(f"step {rows[-1][0]}: loss {np.mean(window):.4f} (mean of {len(window)} steps), {speed}", flush=True)
    return rows[-1][1]


def _summary_writer(workdir: str):
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _progress(start: int, end: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=end, initial=start, desc="train", unit="step", disable=disable, dynamic_ncols=True)


# ---- evaluation -------------------------------------------------------------------------------


def ema_model_fn(run: Run):
    """``model_fn(x, t, cond)`` of the EMA parameters, a pytree callable (new weights do not recompile)."""
    return jax.tree_util.Partial(run.apply_eval, run.state.ema_params)


def generate(run: Run, *, method: str, num_steps: int, num_samples: int, key, cond=None, model_fn=None, **options):
    """Samples from the EMA model with any ``diffjax.sample`` method, ending with the exact denoise at t = 0.

    ``model_fn`` (default: the EMA model) may replace it, e.g. by a ``diffjax.guidance`` denoiser of it. The time grid
    is ``options["grid"]``, else ``config.sample.grid`` when ``method`` is the configured
    ``config.sample.method`` (the grid was chosen for that sampler), else the method's own. The batch is
    split over the run's mesh (zero rows pad it to a multiple of the batch shards); returns host
    samples in the data's range (a latent run's decoded), identical on every process, and the NFE.
    """
    if options.get("grid") is None and method == run.config.sample.method:
        options["grid"] = run.config.sample.get("grid")  # None: the method's default grid
    x_T = to_host(run.schedule.prior_sample(key, (num_samples, *run.sample_shape)))
    x_T, n = shard_batch(x_T, run.mesh)
    if cond is not None:
        cond, _ = shard_batch(cond, run.mesh)
    k = jax.random.fold_in(key, 1)
    x, nfe = sample(model_fn or ema_model_fn(run), run.schedule, x_T, method=method, num_steps=num_steps, key=k,
                    prediction=run.config.diffusion.prediction, cond=cond, t_end=0.0, return_nfe=True, **options)
    if run.decode is not None:
        x = run.decode(run.state.extra, x)
    return to_host(x)[:n], int(nfe)


def _eval_x(run: Run, batch) -> np.ndarray:
    """Evaluation inputs in the model's range: n-bit pixels at the centre of their dequantization
    interval (the mean of the training inputs' uniform noise), toy data as it is."""
    x = np.asarray(batch["x"], np.float32)
    return x if run.spec.num_bits is None else np.asarray(data_lib.to_data_range(x, run.spec.num_bits, 0.5))


def evaluate_classifier(run: Run) -> dict:
    """Test accuracy and cross-entropy of a noise-conditional classifier (EMA weights) on x_t ~ q(x_t | x_0).

    At each time of ``config.eval.classifier_times`` (0 means ``schedule.t_min``) and at t ~ U[t_min,
    t_max] (the training distribution), with noise from a fixed key: ``test_accuracy_t{t}``,
    ``test_accuracy``, ``test_xent``.
    """
    config, schedule = run.config, run.schedule
    if config.eval.num_examples == 0:
        return {}
    t_lo, t_hi = float(schedule.t_min), float(schedule.t_max)
    times = [max(float(t), t_lo) for t in config.eval.classifier_times]
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 10**6)
    logits_of = jax.jit(lambda params, x0, t, eps: run.apply_eval(params, schedule.marginal(x0, t, eps), t))
    hits, xent, count = np.zeros(len(times) + 1), 0.0, 0
    batches = data_lib.eval_batches(config.data.dataset, split=config.eval.split, batch_size=config.eval.batch_size,
                                    num_examples=config.eval.num_examples, data_dir=config.data.data_dir)
    for i, batch in enumerate(batches):
        x0, y = _eval_x(run, batch), np.asarray(batch["label"])
        b = len(y)
        k_t, k_eps = jax.random.split(jax.random.fold_in(key, i))
        t_uniform = np.asarray(jax.random.uniform(k_t, (b,), minval=t_lo, maxval=t_hi))
        eps = to_host(jax.random.normal(k_eps, x0.shape))
        xs, _ = shard_batch(x0, run.mesh)
        es, _ = shard_batch(eps, run.mesh)
        for j, t in enumerate([*times, None]):
            tt = t_uniform if t is None else np.full((b,), t, np.float32)
            ts, _ = shard_batch(tt.astype(np.float32), run.mesh)
            logits = to_host(logits_of(run.state.ema_params, xs, ts, es))[:b]
            hits[j] += np.sum(np.argmax(logits, -1) == y)
            if t is None:
                log_p = np.asarray(jax.nn.log_softmax(logits))
                xent -= float(np.sum(log_p[np.arange(b), y]))
        count += b
    out = {f"test_accuracy_t{t:g}": hits[j] / count for j, t in enumerate(times)}
    out.update(test_accuracy=hits[-1] / count, test_xent=xent / count, eval_examples=count)
    return out


def _eval_keys(config):
    """The sampling and NLL keys of every evaluation (the same at each step, so curves compare like with like)."""
    return jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 10**6))


def _sample_figure(run: Run, key, path: str, writer=None) -> dict:
    """``config.sample.num_samples`` EMA samples as a grid (images) or a scatter plot (toy data) at ``path``
    and, for images, in TensorBoard at the run's step; returns the method, NFE and seconds."""
    config = run.config
    n = config.sample.num_samples
    num_classes = config.model.get("num_classes")
    cond = np.arange(n, dtype=np.int32) % num_classes if num_classes else None
    t0 = time.perf_counter()
    steps = get_task(config.get("task", "diffusion")).sample_steps
    num_steps = config.sample.num_steps if steps is None else int(steps(config, int(jax.device_get(run.state.step))))
    x, nfe = generate(run, method=config.sample.method, num_steps=num_steps, num_samples=n, key=key, cond=cond)
    out = {"sample_method": config.sample.method, "sample_nfe": int(nfe), "sample_seconds": time.perf_counter() - t0}
    if jax.process_index() == 0:
        from diffjax.training import plots

        os.makedirs(os.path.dirname(path), exist_ok=True)
        if run.spec.kind == "image":
            grid = plots.image_grid(x)
            plots.save_png(grid, path, scale=config.sample.png_scale)
            if writer is not None:
                writer.add_image("samples", grid, int(run.state.step), dataformats="HWC")
                writer.flush()
        else:
            plots.scatter(x, path)
    return out


def nll_per_dim(run: Run, batches, key) -> dict:
    """NLL per dimension of the EMA model on ``batches`` of data-range inputs (n-bit integer images: bits/dim
    with uniform dequantization; continuous data: nats/dim), with the config's ``eval`` solver settings."""
    config = run.config
    discrete = run.spec.num_bits is not None
    return evaluate_nll(ema_model_fn(run), run.schedule, batches, key=key, discrete=discrete,
                        num_bits=run.spec.num_bits or 8, prediction=config.diffusion.prediction,
                        trace=config.eval.trace, rtol=config.eval.rtol, atol=config.eval.atol, mesh=run.mesh)


def _test_split_nll(run: Run, key) -> dict:
    """``nll_per_dim`` on ``config.eval.num_examples`` of the eval split, as metrics (test_bpd or test_nats_per_dim)."""
    config = run.config
    t0 = time.perf_counter()
    batches = data_lib.eval_batches(config.data.dataset, split=config.eval.split, batch_size=config.eval.batch_size,
                                    num_examples=config.eval.num_examples, data_dir=config.data.data_dir)
    nll = nll_per_dim(run, (b["x"] if isinstance(b, dict) else b for b in batches), key)
    name = "test_bpd" if run.spec.num_bits is not None else "test_nats_per_dim"
    return {name: nll["mean"], f"{name}_stderr": nll["stderr"], "nll_examples": nll["num_examples"],
            "nll_nfe": nll["nfe"], "nll_seconds": time.perf_counter() - t0}


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _evaluate_during_training(run: Run, workdir: str, step: int, writer) -> None:
    """``training.sample_every``: ``samples/step_<N>.png`` (and TensorBoard); ``training.eval_every``: the test
    NLL (a classifier: its test accuracy) in TensorBoard under ``eval/`` and in ``eval_history.csv``."""
    config, t = run.config, run.config.training
    task = get_task(config.get("task", "diffusion"))
    classifier = config.get("task", "diffusion") == "classifier"
    k_sample, k_nll = _eval_keys(config)
    if _due(step, t.get("sample_every", 0)) and task.samples:
        _sample_figure(run, k_sample, os.path.join(workdir, "samples", f"step_{step}.png"), writer)
    evaluates = task.nll or classifier or task.evaluate is not None
    if not (_due(step, t.get("eval_every", 0)) and config.eval.num_examples > 0 and evaluates):
        return
    if classifier:
        metrics = evaluate_classifier(run)
    else:
        metrics = task.evaluate(run, k_nll) if task.evaluate is not None else _test_split_nll(run, k_nll)
    if jax.process_index() != 0:
        return
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if writer is not None:
        for name, value in metrics.items():
            writer.add_scalar(f"eval/{name}", value, step)
        writer.flush()
    path = os.path.join(workdir, "eval_history.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", *sorted(metrics)])
        w.writerow([step, *(metrics[k] for k in sorted(metrics))])
    logging.warning("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))


def evaluate(run: Run, workdir: str) -> dict:
    """Sample a grid with the EMA weights and compute the test NLL; write PNGs, TensorBoard and a dict.

    A classifier run (``config.task == "classifier"``) reports ``evaluate_classifier`` instead; a task with its own
    ``TaskSpec.evaluate`` reports that in place of the test NLL; a task that draws no samples writes no grid.
    """
    config = run.config
    if config.get("task", "diffusion") == "classifier":
        if jax.process_index() == 0:
            from diffjax.training import plots

            plots.loss_curve(os.path.join(workdir, "loss_history.csv"), os.path.join(workdir, "loss_curve.png"))
        return evaluate_classifier(run)
    k_sample, k_nll = _eval_keys(config)
    task = get_task(config.get("task", "diffusion"))
    writer = _summary_writer(workdir) if jax.process_index() == 0 else None
    out = _sample_figure(run, k_sample, os.path.join(workdir, "samples.png"), writer) if task.samples else {}
    if jax.process_index() == 0:
        from diffjax.training import plots

        plots.loss_curve(os.path.join(workdir, "loss_history.csv"), os.path.join(workdir, "loss_curve.png"))
    if config.eval.num_examples > 0 and task.evaluate is not None:
        out.update(task.evaluate(run, k_nll))
    elif config.eval.num_examples > 0 and task.nll:
        out.update(_test_split_nll(run, k_nll))
    return out


def train_and_evaluate(config, workdir: str, progress: bool = True) -> dict:
    """The main job: train (resuming if ``workdir`` has checkpoints), evaluate, write ``metrics.json``."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:  # what `python -m diffjax.generate --workdir` rebuilds the model from
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    t0 = time.perf_counter()
    run = setup(config, workdir)
    run, summary = train(config, workdir, run=run, progress=progress)
    metrics = {**summary, "train_seconds": time.perf_counter() - t0,
               "num_params": models_lib.count_params(run.state.params), "num_devices": run.mesh.size,
               "num_processes": jax.process_count()}
    if summary["preempted"]:  # checkpointed; rerunning the same command resumes
        return metrics
    metrics.update(evaluate(run, workdir))
    metrics["total_seconds"] = time.perf_counter() - t0
    # NaN (e.g. steps_per_sec of a run too short to time past compilation) is written as null
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
    return metrics
