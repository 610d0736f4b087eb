"""Task "latent_diffusion": a denoiser (``config.model``: U-Net or DiT) trained on the latents of an autoencoder
run (Rombach et al. 2022, sec. 3-4), sampled and returned as images.

``config.latent``: ``autoencoder_workdir`` (a finished ``task = "autoencoder"`` run; its latest checkpoint's EMA
weights), ``scale_factor`` (None: estimated) and ``scale_batches``. ``config.autoencoder`` holds the autoencoder's
architecture, which must equal the autoencoder run's (checked when training starts, ``ConfigError`` naming the
field): it fixes the latent shape (H / f, W / f, latent_channels) the network sees and the structure restored.

* Training: every step encodes the pixel batch with the frozen autoencoder, draws z from the posterior (as LDM's
  ``get_first_stage_encoding``) and trains the denoiser of ``config.diffusion`` on y = scale_factor z.
* Scale factor (LDM's ``scale_by_std``): 1 / std of posterior samples of the first ``scale_batches`` training
  batches (the run's own data stream from step 0, every process the whole global batch, so all agree), so the
  latents the diffusion sees have unit variance; a number in ``scale_factor`` is used as it is.
* ``TrainState.extra`` = {"autoencoder": the autoencoder's weights, "scale_factor": float32 scalar}: every
  checkpoint carries the decoder (and encoder) it was trained with and the scale factor, so a resume neither
  re-estimates it nor reads the autoencoder run, and ``diffjax.load_run`` / ``python -m diffjax.generate`` need
  only this run's workdir (the autoencoder run may be retrained or deleted without changing this model).
* Sampling: y ~ the sampler in latent space, then x = decode(y / scale_factor), clipped and quantized like a pixel
  model's samples (``TrainedRun.sample`` returns n-bit images (N, H, W, C)).
* Evaluation: the NLL of the test images' latents, reported in latent space: ``test_latent_bits_per_dim``, bits
  per dimension of the autoencoder's latent z = posterior mean (unscaled: log p(z) = log p_y(s z) + D log s, so it
  does not depend on the estimated s), through the probability-flow ODE of the run's denoiser on y.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import autoencoder as ae
from diffjax import data as data_lib
from diffjax.likelihood import evaluate_nll
from diffjax.losses import make_loss
from diffjax.training import task_autoencoder
from diffjax.training.builders import ConfigError, _fail, denoiser_loss_kwargs, with_dropout_key
from diffjax.training.step import ContextLoss
from diffjax.training.tasks import TaskSpec

__all__ = ["TASK", "DENOISERS", "latent_section", "load_autoencoder", "estimate_scale_factor"]

DENOISERS = ("unet", "dit")


def latent_section(autoencoder_workdir: str, **fields):
    """The ``config.latent`` section (its one definition) with ``fields`` replacing the defaults."""
    import ml_collections
    from ml_collections import config_dict

    s = ml_collections.ConfigDict()
    s.autoencoder_workdir = autoencoder_workdir
    s.scale_factor = config_dict.placeholder(float)  # None: 1 / std of the first batches' latents
    s.scale_batches = 1  # training batches the scale factor is estimated on (LDM: the first one)
    unknown = sorted(set(fields) - set(s.keys()))
    if unknown:
        raise KeyError(f"config.latent has no field(s) {unknown}; fields: {sorted(s.keys())}")
    s.update(fields)
    return s


def validate(config) -> None:
    """Reject an unusable latent-diffusion config naming the field (no I/O)."""
    task_autoencoder.validate_section(config)
    if config.model.name not in DENOISERS:
        _fail("model.name", f"task 'latent_diffusion' trains a denoiser on (h, w, c) latents: one of {DENOISERS}; "
                            f"got {config.model.name!r}")
    s = config.get("latent")
    if s is None:
        _fail("latent", "task 'latent_diffusion' needs a config.latent section (experiments/configs/"
                        "digits_latent_unet.py)")
    if not (isinstance(s.get("autoencoder_workdir"), str) and s.autoencoder_workdir):
        _fail("latent.autoencoder_workdir", f"must name a trained autoencoder run; got "
                                            f"{s.get('autoencoder_workdir')!r}")
    v = s.get("scale_factor")
    if v is not None and (isinstance(v, bool) or not (isinstance(v, (int, float)) and 0 < v < math.inf)):
        _fail("latent.scale_factor", f"must be a finite number > 0, or None (estimated); got {v!r}")
    n = s.get("scale_batches")
    if isinstance(n, bool) or not (isinstance(n, int) and n >= 1):
        _fail("latent.scale_batches", f"must be an integer >= 1; got {n!r}")


def _model_shape(config) -> tuple:
    a = config.autoencoder
    return ae.latent_shape(data_lib.get_spec(config.data.dataset).shape, a.ch_mult, a.latent_channels)


def load_autoencoder(config):
    """(module, EMA params) of ``config.latent.autoencoder_workdir``'s latest checkpoint, after checking that its
    data set and ``config.autoencoder`` architecture are this run's (``ConfigError`` naming the field)."""
    from diffjax import runs

    workdir = config.latent.autoencoder_workdir
    try:
        run = runs.load_run(workdir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config.latent.autoencoder_workdir: {e}") from None
    if run.task != "autoencoder":
        raise ConfigError(f"config.latent.autoencoder_workdir: {workdir} holds a {run.task} run, not an autoencoder")
    if run.config.data.dataset != config.data.dataset:
        raise ConfigError(f"config.data.dataset: {config.data.dataset!r} differs from the autoencoder's "
                          f"{run.config.data.dataset!r} (config.latent.autoencoder_workdir = {workdir!r})")
    for name in task_autoencoder.ARCH_FIELDS:
        mine, theirs = config.autoencoder.get(name), run.config.autoencoder.get(name)
        mine, theirs = (list(v) if isinstance(v, (tuple, list)) else v for v in (mine, theirs))
        if mine != theirs:
            raise ConfigError(f"config.autoencoder.{name}: {mine!r} differs from the autoencoder run's {theirs!r} "
                              f"(config.latent.autoencoder_workdir = {workdir!r})")
    return run.run.module, jax.tree.map(jnp.array, run.params)


def estimate_scale_factor(config, module, params) -> float:
    """1 / std of posterior samples of the first ``config.latent.scale_batches`` global training batches (LDM's
    ``scale_by_std``), with noise from the run's seed."""
    codec = ae.make_codec(module)
    batches = data_lib.train_batches(config.data.dataset, global_batch_size=config.training.batch_size,
                                     seed=config.seed, start_step=0, dequantize=config.data.dequantize,
                                     random_flip=config.data.random_flip, data_dir=config.data.data_dir)
    sample = jax.jit(lambda p, x, k: ae.posterior_sample(k, codec.encode(p, x)))
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2**20)
    latents = [np.asarray(sample(params, next(batches)["x"], jax.random.fold_in(key, i)))
               for i in range(config.latent.scale_batches)]
    return float(ae.scale_factor(np.concatenate(latents)))


def _init(config, schedule, module, params, restore_only):
    if restore_only:  # the structure a checkpoint is restored over; the autoencoder run is not read
        ae_module = task_autoencoder.build_autoencoder(config)
        spec = data_lib.get_spec(config.data.dataset)
        ae_params = task_autoencoder.init_autoencoder(ae_module, jax.random.PRNGKey(0), (1, *spec.shape))
        return params, {"autoencoder": ae_params, "scale_factor": jnp.zeros((), jnp.float32)}
    ae_module, ae_params = load_autoencoder(config)
    s = config.latent.get("scale_factor")
    s = estimate_scale_factor(config, ae_module, ae_params) if s is None else float(s)
    if not (math.isfinite(s) and s > 0):
        raise ConfigError(f"config.latent.autoencoder_workdir: its latents give the scale factor {s} (their std "
                          f"is 0 or not finite)")
    return params, {"autoencoder": ae_params, "scale_factor": jnp.asarray(s, jnp.float32)}


def _build_loss(config, schedule, module):
    encode = ae.make_codec(task_autoencoder.build_autoencoder(config)).encode
    make = functools.partial(make_loss, schedule=schedule, **denoiser_loss_kwargs(config))
    denoiser_loss = with_dropout_key(module, make, strip_labels=not config.model.get("num_classes"))

    def loss_fn(params, batch, key, ctx):
        k_z, k_loss = jax.random.split(key)
        z = ae.posterior_sample(k_z, encode(ctx.extra["autoencoder"], batch["x"]))
        y = jax.lax.stop_gradient(z * ctx.extra["scale_factor"])
        return denoiser_loss(params, {**batch, "x": y}, k_loss)

    return ContextLoss(loss_fn)


def _decode(config):
    decode = ae.make_codec(task_autoencoder.build_autoencoder(config)).decode

    @jax.jit
    def to_images(extra, y):
        return jnp.clip(decode(extra["autoencoder"], y / extra["scale_factor"]), *data_lib.DATA_RANGE)

    return to_images


def evaluate(run, key) -> dict:
    """``test_latent_bits_per_dim`` (module docstring) on ``config.eval.num_examples`` test images, the scale factor."""
    from diffjax.training.loop import ema_model_fn

    config = run.config
    t0 = time.perf_counter()
    encode = ae.make_codec(task_autoencoder.build_autoencoder(config)).encode
    scaled_mean = jax.jit(lambda extra, x: encode(extra["autoencoder"], x).mean * extra["scale_factor"])
    extra = run.state.extra
    batches = data_lib.eval_batches(config.data.dataset, split=config.eval.split, batch_size=config.eval.batch_size,
                                    num_examples=config.eval.num_examples, data_dir=config.data.data_dir)
    ys = (np.asarray(scaled_mean(extra, task_autoencoder.image_inputs(config, b["x"]))) for b in batches)
    nll = evaluate_nll(ema_model_fn(run), run.schedule, ys, key=key, discrete=False,
                       prediction=config.diffusion.prediction, trace=config.eval.trace, rtol=config.eval.rtol,
                       atol=config.eval.atol, mesh=run.mesh)
    s = float(jax.device_get(extra["scale_factor"]))
    # nats/dim of y = s z to bits/dim of z: -log p_z(z) / D = -log p_y(s z) / D - log s
    bpd = (nll["mean"] - math.log(s)) / math.log(2.0)
    return {"test_latent_bits_per_dim": bpd, "test_latent_bits_per_dim_stderr": nll["stderr"] / math.log(2.0),
            "nll_examples": nll["num_examples"], "nll_nfe": nll["nfe"], "nll_seconds": time.perf_counter() - t0,
            "latent_scale_factor": s}


TASK = TaskSpec(build_loss=_build_loss, validate=validate, init=_init, samples=True, nll=False,
                model_shape=_model_shape, decode=_decode, evaluate=evaluate)
