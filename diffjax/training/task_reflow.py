"""Task "reflow": the k+1-rectified flow trained on couplings of a k-rectified flow (``diffjax.reflow``).

The teacher is ``config.distill.teacher_workdir`` (a flow, reflow or diffusion run; its EMA weights). At the
start of training the couplings (z, x = teacher ODE(z)) are written to ``config.reflow.couplings_dir`` unless a
complete set is already there (a rerun resumes a partial set, shard by shard); then the student trains on them:

* by default the flow-matching objective on the couplings' interpolants (``diffjax.losses`` objective "flow" with
  ``batch["noise"]`` = z; Liu et al. 2022 eq. 1), initialised from the teacher's weights
  (``config.reflow.init = "teacher"``: Liu et al.'s reflow fine-tunes the previous flow, their code's
  ``reflow.last_flow_ckpt``), or from scratch (``"scratch"``, e.g. couplings of a diffusion teacher);
* with ``config.reflow.distill = True``, one-step distillation (Liu et al. sec. 2.3; ``make_distill_loss``): the
  network's one Euler step from z regresses x; the result is a one-step generator (``sample.num_steps = 1``),
  not the ODE's velocity field, so it has no test NLL (``eval.num_examples = 0``).

``config.reflow`` fields: ``couplings_dir``, ``num_pairs``, ``shard_size``, ``batch_size`` (rows per solve; None:
shard_size), ``seed`` (the couplings' noise), ``method`` / ``num_steps`` / ``t_start`` / ``options`` (the
teacher's sampler, through ``diffjax.sample``), ``distill``, ``init``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from diffjax import data as data_lib
from diffjax import reflow
from diffjax.losses import make_loss
from diffjax.samplers import METHODS, SAMPLERS
from diffjax.training.builders import ConfigError, _fail, denoiser_loss_kwargs, with_dropout_key
from diffjax.training.tasks import _SAME_FIELDS, TaskSpec, load_teacher

__all__ = ["TASK", "INITS", "reflow_config", "ensure_couplings", "couplings_settings"]

INITS = ("teacher", "scratch")


def reflow_config(config, *, teacher_workdir: str, couplings_dir: str, **fields):
    """``config`` made a reflow run (in place, returned): task "reflow", the teacher, and ``config.reflow`` (its one
    definition) with ``fields`` replacing the defaults."""
    import ml_collections
    from ml_collections import config_dict

    config.task = "reflow"
    config.distill.teacher_workdir = teacher_workdir
    r = ml_collections.ConfigDict()
    r.couplings_dir = couplings_dir
    r.num_pairs = 100_000
    r.shard_size = 10_000
    r.batch_size = config_dict.placeholder(int)  # rows per teacher solve (None: shard_size)
    r.seed = 0  # the couplings' noise
    r.method, r.num_steps = "heun", 10  # the teacher's ODE solver (diffjax.sample)
    r.t_start = config_dict.placeholder(float)  # None: the teacher schedule's t_max, where its sampler starts
    r.options = ml_collections.ConfigDict()  # more diffjax.sample options of the teacher's solver
    r.distill = False
    r.init = "teacher"  # fine-tune the teacher (Liu et al.'s code: reflow.last_flow_ckpt)
    unknown = sorted(set(fields) - set(r.keys()))
    if unknown:
        raise KeyError(f"config.reflow has no field(s) {unknown}; fields: {sorted(r.keys())}")
    r.update(fields)
    config.reflow = r
    return config


def _int(r, name, low):
    v = r.get(name)
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
        _fail(f"reflow.{name}", f"must be an integer >= {low}; got {v!r}")


def validate(config) -> None:
    """Reject a reflow config naming the field (no I/O)."""
    d = config.diffusion
    if d.schedule != "rectified_flow":
        _fail("diffusion.schedule", f"task 'reflow' trains a rectified flow: must be 'rectified_flow'; "
                                    f"got {d.schedule!r}")
    if d.prediction != "flow":
        _fail("diffusion.prediction", f"task 'reflow' trains a velocity field: must be 'flow'; got {d.prediction!r}")
    if d.objective != "flow":
        _fail("diffusion.objective", f"task 'reflow' regresses the couplings' velocity: must be 'flow'; "
                                     f"got {d.objective!r}")
    if d.get("learned_variance", False):
        _fail("diffusion.learned_variance", "a flow model has no variance to learn")
    teacher = config.get("distill", {}).get("teacher_workdir")
    if not (isinstance(teacher, str) and teacher):
        _fail("distill.teacher_workdir", f"task 'reflow' needs the run whose ODE gives the couplings; got {teacher!r}")
    r = config.get("reflow")
    if r is None:
        _fail("reflow", "task 'reflow' needs a config.reflow section (experiments/configs/digits_reflow.py)")
    if not (isinstance(r.get("couplings_dir"), str) and r.couplings_dir):
        _fail("reflow.couplings_dir", f"must name the directory of the couplings; got {r.get('couplings_dir')!r}")
    _int(r, "num_pairs", 1)
    _int(r, "shard_size", 1)
    _int(r, "seed", 0)
    _int(r, "num_steps", 1)
    if r.get("batch_size") is not None:
        _int(r, "batch_size", 1)
    if r.get("method") not in METHODS:
        _fail("reflow.method", f"must be one of {METHODS}; got {r.get('method')!r}")
    unknown = set((r.get("options") or {}).keys()) - SAMPLERS[r.method].sample_options
    if unknown:
        _fail("reflow.options", f"unknown option(s) {sorted(unknown)} for method {r.method!r}; allowed: "
                                f"{sorted(SAMPLERS[r.method].sample_options)}")
    t_start = r.get("t_start")
    if t_start is not None and not (isinstance(t_start, (int, float)) and 0.0 < t_start <= 1.0):
        _fail("reflow.t_start", f"must lie in (0, 1] or be None (the teacher schedule's t_max); got {t_start!r}")
    if r.get("init") not in INITS:
        _fail("reflow.init", f"must be one of {INITS}; got {r.get('init')!r}")
    if not isinstance(r.get("distill"), bool):
        _fail("reflow.distill", f"must be True or False; got {r.get('distill')!r}")
    if r.distill and config.sample.num_steps != 1:
        _fail("sample.num_steps", f"a one-step distilled model (config.reflow.distill) samples in 1 step; "
                                  f"got {config.sample.num_steps}")
    if r.distill and config.eval.num_examples:
        _fail("eval.num_examples", "a one-step distilled model (config.reflow.distill) is not the ODE's velocity "
                                   "field and has no likelihood: set 0")


def _check_fields(config):
    """What the teacher must share with the student: everything it is initialised from, else the data."""
    return _SAME_FIELDS if config.reflow.init == "teacher" else ("data.dataset",)


def couplings_settings(config) -> dict:
    """The ``diffjax.reflow.coupling_settings`` the run's couplings must have."""
    r = config.reflow
    return reflow.coupling_settings(num_pairs=r.num_pairs, shard_size=r.shard_size,
                                    shape=data_lib.get_spec(config.data.dataset).shape, seed=r.seed,
                                    method=r.method, num_steps=r.num_steps,
                                    num_classes=config.model.get("num_classes"), t_start=r.get("t_start"),
                                    sample_options=dict(r.get("options") or {}))


def ensure_couplings(config, process_index: int, process_count: int) -> dict:
    """Write the missing shards of ``config.reflow.couplings_dir`` from the teacher (read only if some are missing);
    returns ``generate_couplings``' summary, or the manifest when nothing was missing."""
    r = config.reflow
    settings = couplings_settings(config)
    manifest = reflow.read_manifest(r.couplings_dir)
    if manifest is not None and not reflow.missing_shards(r.couplings_dir, settings):
        return manifest
    teacher = load_teacher(config, _check_fields(config))
    if teacher.config.get("reflow", {}).get("distill", False):
        raise ConfigError(f"config.distill.teacher_workdir: {config.distill.teacher_workdir} holds a one-step "
                          f"distilled model, not an ODE")
    student_std = float(_student_schedule(config).prior_std)
    if abs(float(teacher.schedule.prior_std) - student_std) > 1e-6:
        raise ConfigError(f"config.distill.teacher_workdir: the teacher's prior N(0, "
                          f"{float(teacher.schedule.prior_std)}^2) is not the rectified flow's N(0, {student_std}^2): "
                          f"its noise cannot be the student's z")
    if teacher.config.model.get("num_classes") != config.model.get("num_classes"):
        raise ConfigError(f"config.model.num_classes: {config.model.get('num_classes')!r} differs from the teacher's "
                          f"{teacher.config.model.get('num_classes')!r} (the couplings carry the teacher's labels)")
    model_fn = jax.tree_util.Partial(teacher.apply, teacher.params)
    from diffjax.training.checkpoint import Checkpointer

    step = Checkpointer(os.path.join(config.distill.teacher_workdir, "checkpoints"), read_only=True).latest_step()
    return reflow.generate_couplings(
        model_fn, teacher.schedule, r.couplings_dir, num_pairs=r.num_pairs, shape=settings["shape"],
        shard_size=r.shard_size, batch_size=r.get("batch_size"), seed=r.seed, method=r.method,
        num_steps=r.num_steps, prediction=teacher.prediction, num_classes=settings["num_classes"],
        t_start=r.get("t_start"), process_index=process_index, process_count=process_count,
        metadata={"teacher_workdir": os.path.abspath(config.distill.teacher_workdir), "teacher_step": step},
        **dict(r.get("options") or {}))


def _student_schedule(config):
    from diffjax.training.builders import build_schedule

    return build_schedule(config.diffusion)


def _build_loss(config, schedule, module):
    if config.reflow.distill:
        make = functools.partial(reflow.make_distill_loss, schedule=schedule, prediction=config.diffusion.prediction)
    else:
        make = functools.partial(make_loss, schedule=schedule, **denoiser_loss_kwargs(config))
    # an unconditional model does not see the couplings' labels (if any)
    return with_dropout_key(module, make, strip_labels=not config.model.get("num_classes"))


def _init(config, schedule, module, params, restore_only):
    if restore_only or config.reflow.init == "scratch":
        return params, None
    teacher = load_teacher(config, _check_fields(config))
    if teacher.prediction != "flow" or teacher.config.diffusion.schedule != "rectified_flow":
        raise ConfigError(f"config.reflow.init: 'teacher' starts from the teacher's weights, which must be a flow "
                          f"model on rectified_flow; the teacher predicts {teacher.prediction!r} on "
                          f"{teacher.config.diffusion.schedule!r}: use 'scratch'")
    return jax.tree.map(jnp.array, teacher.params), None


def _batches(config, start_step, process_index, process_count):
    summary = ensure_couplings(config, process_index, process_count)
    if summary.get("written") and process_index == 0:
        print(f"reflow: wrote {len(summary['written'])} coupling shards to {config.reflow.couplings_dir} in "
              f"{summary['seconds']:.1f} s ({summary['nfe']} NFE per sample)", flush=True)
    if jax.process_count() > 1:  # every process's shards are on disk before any process reads them
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("reflow couplings written")
    return reflow.coupling_batches(config.reflow.couplings_dir, global_batch_size=config.training.batch_size,
                                   seed=config.seed, start_step=start_step, process_index=process_index,
                                   process_count=process_count)


TASK = TaskSpec(build_loss=_build_loss, validate=validate, init=_init, batches=_batches, samples=True, nll=True)
