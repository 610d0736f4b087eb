"""From a config to the library's objects: the one place config names map to schedules, models, losses.

Every check names the config field it rejects (``config.model.name``, ``config.optim.learning_rate``,
...), before anything is compiled or a data set is touched.
"""

from __future__ import annotations

import functools

import jax

from diffjax import data as data_lib
from diffjax import models as models_lib
from diffjax.losses import OBJECTIVES, TIME_SAMPLINGS, make_classifier_loss, make_loss
from diffjax.models.ops import DTYPES, KERNELS
from diffjax.parameterization import PREDICTION_TYPES
from diffjax.samplers import METHODS
from diffjax.schedules import VE, DiscreteDDPM, RectifiedFlow, SubVP, VPCosine, VPLinear
from diffjax.training.state import make_optimizer
from diffjax.training.tasks import TASK_NAMES, TaskSpec, get_task
from diffjax.sharding import mesh_shape
from diffjax.timesteps import SUBSEQUENCE_GRIDS, parse_grid

__all__ = ["SCHEDULES", "TASKS", "DIFFUSION_TASK", "CLASSIFIER_TASK", "ConfigError", "denoiser_loss_kwargs", "validate_config", "build_schedule", "build_model", "model_shape", "build_loss",
           "build_optimizer"]

SCHEDULES = {
    "vp_linear": lambda c: VPLinear(beta_min=c.beta_min, beta_max=c.beta_max),
    "vp_cosine": lambda c: VPCosine(),
    "subvp": lambda c: SubVP(beta_min=c.beta_min, beta_max=c.beta_max),
    "ve": lambda c: VE(sigma_min=c.sigma_min, sigma_max=c.sigma_max),
    "rectified_flow": lambda c: RectifiedFlow(),
    "ddpm_linear": lambda c: DiscreteDDPM.linear(c.num_timesteps),
    "ddpm_cosine": lambda c: DiscreteDDPM.cosine(c.num_timesteps),
}

TASKS = TASK_NAMES
CLASSIFIER_MODELS = ("classifier", "mlp")  # "mlp" with out_dim = classes is the classifier for (B, D) data


class ConfigError(ValueError):
    """A config field holds a value the run cannot use; the message names the field."""


def _fail(field: str, msg: str):
    raise ConfigError(f"config.{field}: {msg}")


def _positive_int(config, field: str, allow_zero: bool = False):
    v = config
    for part in field.split("."):
        v = v[part]
    if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
        _fail(field, f"must be an integer >= {0 if allow_zero else 1}; got {v!r}")
    return v


def validate_config(config, num_devices: int | None = None) -> None:
    """Reject an unusable config with a ``ConfigError`` naming the field (no compilation, no I/O)."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    if not isinstance(config.seed, int):
        _fail("seed", f"must be an integer; got {config.seed!r}")
    try:
        data_lib.get_spec(config.data.dataset)
    except ValueError as e:
        _fail("data.dataset", str(e))
    if config.model.name not in models_lib.MODELS:
        _fail("model.name", f"unknown model {config.model.name!r}; known models: {sorted(models_lib.MODELS)}")
    if config.model.get("dtype") not in DTYPES:
        _fail("model.dtype", f"must be one of {DTYPES} (the compute dtype; parameters stay float32); "
                             f"got {config.model.get('dtype')!r}")
    if config.model.get("kernels", "auto") not in KERNELS:
        _fail("model.kernels", f"must be one of {KERNELS}; got {config.model.get('kernels')!r}")
    task = config.get("task", "diffusion")
    if task not in TASKS:
        _fail("task", f"must be one of {TASKS}; got {task!r}")
    if task == "classifier":
        _validate_classifier(config)
    elif config.model.name == "classifier":
        _fail("model.name", "'classifier' is the network of task 'classifier'; set config.task = 'classifier'")
    get_task(task).validate(config)
    d = config.diffusion
    if d.schedule not in SCHEDULES:
        _fail("diffusion.schedule", f"unknown schedule {d.schedule!r}; known: {sorted(SCHEDULES)}")
    if d.prediction not in PREDICTION_TYPES:
        _fail("diffusion.prediction", f"must be one of {PREDICTION_TYPES}; got {d.prediction!r}")
    if d.objective not in OBJECTIVES:
        _fail("diffusion.objective", f"must be one of {OBJECTIVES}; got {d.objective!r}")
    if d.get("time_sampling", "uniform") not in TIME_SAMPLINGS:
        _fail("diffusion.time_sampling", f"must be one of {TIME_SAMPLINGS}; got {d.time_sampling!r}")
    if d.get("time_sampling", "uniform") == "logit_normal":
        if d.schedule.startswith("ddpm_"):
            _fail("diffusion.time_sampling", "'logit_normal' draws continuous times; a ddpm_* chain draws steps")
        ln = d.get("logit_normal", (0.0, 1.0))
        if not (len(ln) == 2 and ln[1] > 0):
            _fail("diffusion.logit_normal", f"must be (mean, std) with std > 0; got {ln!r}")
    gamma = d.get("min_snr_gamma")
    if gamma is not None and not (isinstance(gamma, (int, float)) and gamma > 0):
        _fail("diffusion.min_snr_gamma", f"must be > 0 (or None: off); got {gamma!r}")
    if gamma is not None and d.objective not in ("eps", "x0", "v"):
        _fail("diffusion.min_snr_gamma", f"weights the objectives eps, x0, v; got objective {d.objective!r}")
    o = config.optim
    if not (isinstance(o.learning_rate, (int, float)) and o.learning_rate > 0):
        _fail("optim.learning_rate", f"must be > 0; got {o.learning_rate!r}")
    if not 0.0 <= o.ema_decay < 1.0:
        _fail("optim.ema_decay", f"must lie in [0, 1); got {o.ema_decay!r}")
    if not isinstance(o.get("ema_warmup", False), bool):
        _fail("optim.ema_warmup", f"must be True or False; got {o.ema_warmup!r}")
    if o.grad_clip < 0:
        _fail("optim.grad_clip", f"must be >= 0 (0 disables clipping); got {o.grad_clip!r}")
    t = config.training
    batch = _positive_int(config, "training.batch_size")
    try:
        sizes = mesh_shape(t.mesh.to_dict(), num_devices)
    except ValueError as e:
        _fail("training.mesh", str(e))
    shards = sizes["data"] * sizes["fsdp"]
    if batch % shards:
        _fail("training.batch_size", f"{batch} is not divisible by the batch shards data x fsdp = {shards}")
    accum = _positive_int(config, "training.grad_accum_steps") if "grad_accum_steps" in t else 1
    if batch % (accum * shards):
        _fail("training.grad_accum_steps", f"batch_size {batch} is not divisible by grad_accum_steps x batch "
                                           f"shards = {accum} x {shards} (each micro-batch is split over the mesh)")
    if batch % jax.process_count():
        _fail("training.batch_size", f"{batch} is not divisible by the process count {jax.process_count()}")
    num_steps = _positive_int(config, "training.num_steps")
    k = _positive_int(config, "training.steps_per_call")
    for field in ("training.log_every", "training.checkpoint_every"):
        every = _positive_int(config, field)
        if every % k:
            _fail(field, f"{every} must be a multiple of training.steps_per_call={k}")
    for name in ("sample_every", "eval_every"):
        every = _positive_int(config, f"training.{name}", allow_zero=True) if name in t else 0
        if every % k:
            _fail(f"training.{name}", f"{every} must be a multiple of training.steps_per_call={k} (0: off)")
    if t.get("sample_every", 0) and not get_task(task).samples:
        _fail("training.sample_every", f"task {task!r} draws no samples; leave it 0")
    if num_steps % k:
        _fail("training.num_steps", f"{num_steps} must be a multiple of training.steps_per_call={k}")
    budget = t.get("max_train_seconds")
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        _fail("training.max_train_seconds", f"must be > 0 seconds or None; got {budget!r}")
    _positive_int(config, "training.max_to_keep")
    _positive_int(config, "training.fsdp_min_size")
    if config.sample.method not in METHODS:
        _fail("sample.method", f"unknown sampler {config.sample.method!r}; known: {sorted(METHODS)}")
    _positive_int(config, "sample.num_steps")
    grid = config.sample.get("grid")
    if grid is not None:
        try:
            grid_name, _ = parse_grid(grid)
        except ValueError as e:
            _fail("sample.grid", f"{e}; or None (the method's default)")
    if grid is not None and grid_name in SUBSEQUENCE_GRIDS and not config.diffusion.schedule.startswith("ddpm_"):
        _fail("sample.grid", f"{grid!r} is a sub-sequence of a discrete DDPM chain; config.diffusion.schedule "
                             f"is {config.diffusion.schedule!r}")
    _positive_int(config, "sample.num_samples")
    _positive_int(config, "eval.num_examples", allow_zero=True)
    _positive_int(config, "eval.batch_size")
    if config.eval.trace not in ("exact", "hutchinson"):
        _fail("eval.trace", f"must be 'exact' or 'hutchinson'; got {config.eval.trace!r}")


def _validate_classifier(config) -> None:
    spec = data_lib.get_spec(config.data.dataset)
    if not spec.num_classes:
        _fail("data.dataset", f"task 'classifier' needs labelled data; {config.data.dataset!r} has no classes")
    if config.model.name not in CLASSIFIER_MODELS:
        _fail("model.name", f"task 'classifier' trains one of {CLASSIFIER_MODELS}; got {config.model.name!r}")
    if config.model.get("num_classes") is not None:
        _fail("model.num_classes", "must be None for task 'classifier' (the class is the output, not an input)")
    out = config.model.get("out_dim" if config.model.name == "mlp" else "out_channels")
    if out is not None and out != spec.num_classes:
        _fail("model.out_dim" if config.model.name == "mlp" else "model.out_channels",
              f"{out} != the {spec.num_classes} classes of {config.data.dataset!r} (leave it None)")
    if config.diffusion.get("learned_variance", False):
        _fail("diffusion.learned_variance", "applies to denoisers, not to task 'classifier'")


def build_schedule(diffusion_config):
    """The schedule named by ``config.diffusion.schedule`` with its parameters."""
    return SCHEDULES[diffusion_config.schedule](diffusion_config)


def model_shape(config) -> tuple:
    """The shape of one example the task's network sees and its sampler draws (``TaskSpec.model_shape``; by
    default the data's)."""
    shape = get_task(config.get("task", "diffusion")).model_shape
    return tuple(data_lib.get_spec(config.data.dataset).shape) if shape is None else tuple(shape(config))


def build_model(config):
    """The task's network (``TaskSpec.build_model``), by default the Flax module named by ``config.model.name``
    (fields from ``config.model`` minus ``name``); a config without ``model.dtype`` / ``model.kernels``
    (experiment configs that replace ``config.model``, runs saved before these fields) gets float32 compute and
    "auto" kernels."""
    task = get_task(config.get("task", "diffusion"))
    if task.build_model is not None:
        return task.build_model(config)
    fields = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    fields.setdefault("dtype", None)
    fields.setdefault("kernels", "auto")
    out_field = "out_dim" if config.model.name == "mlp" else "out_channels"
    if config.get("task", "diffusion") == "classifier":
        fields[out_field] = data_lib.get_spec(config.data.dataset).num_classes  # the logits
    elif config.diffusion.get("learned_variance", False):
        fields[out_field] = 2 * model_shape(config)[-1]  # prediction and variance channels
    try:
        return models_lib.create_model(config.model.name, **fields)
    except (TypeError, ValueError) as e:
        _fail("model", str(e))


def build_optimizer(config):
    """Adam/AdamW + warm-up + clipping from ``config.optim``."""
    o = config.optim
    return make_optimizer(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, grad_clip=o.grad_clip,
                          weight_decay=o.weight_decay, optimizer=o.optimizer)


def build_loss(config, schedule, module):
    """``loss_fn(params, batch, key)`` (or a ``ContextLoss``) of ``config.task`` for the module in training
    mode (dropout keyed from ``key``)."""
    return get_task(config.get("task", "diffusion")).build_loss(config, schedule, module)


def denoiser_loss_kwargs(config) -> dict:
    """``make_loss`` keyword arguments from ``config.diffusion`` (objective, weighting, time sampling, condition
    dropout): the denoising objective of task "diffusion", reused by tasks that train a denoiser on other data."""
    d = config.diffusion
    kwargs = dict(prediction=d.prediction, objective=d.objective, weighting=d.weighting,
                  antithetic=d.antithetic, learned_variance=d.get("learned_variance", False),
                  min_snr_gamma=d.get("min_snr_gamma"))
    if d.get("time_sampling", "uniform") != "uniform":
        kwargs.update(time_sampling=d.time_sampling, logit_normal=tuple(d.get("logit_normal", (0.0, 1.0))))
    num_classes = config.model.get("num_classes")
    if num_classes is not None and d.cond_drop_prob > 0:
        kwargs.update(cond_drop_prob=d.cond_drop_prob, null_label=num_classes)
    return kwargs


def with_dropout_key(module, make_loss_of_model, strip_labels: bool):
    """``loss_fn(params, batch, key)`` from ``make_loss_of_model(model_fn) -> loss_fn``: the model in training
    mode with its dropout keyed from a split of ``key``; ``strip_labels``: the batch's labels are dropped
    (an unconditional model never sees them)."""
    apply = models_lib.make_model_fn(module, train=True)

    def loss_fn(params, batch, key):
        k_loss, k_drop = jax.random.split(key)
        if strip_labels:
            batch = {k: v for k, v in batch.items() if k != "label"}

        def model_fn(p, x, t, cond):
            return apply(p, x, t, cond, rng=k_drop)

        return make_loss_of_model(model_fn)(params, batch, k_loss)

    return loss_fn


def _diffusion_loss(config, schedule, module):
    make = functools.partial(make_loss, schedule=schedule, **denoiser_loss_kwargs(config))
    return with_dropout_key(module, make, strip_labels=not config.model.get("num_classes"))


def _classifier_loss(config, schedule, module):
    classes = data_lib.get_spec(config.data.dataset).num_classes
    make = functools.partial(make_classifier_loss, schedule=schedule, num_classes=classes,
                             antithetic=config.diffusion.antithetic)
    return with_dropout_key(module, make, strip_labels=False)


DIFFUSION_TASK = TaskSpec(build_loss=_diffusion_loss)
CLASSIFIER_TASK = TaskSpec(build_loss=_classifier_loss, samples=False, nll=False)
