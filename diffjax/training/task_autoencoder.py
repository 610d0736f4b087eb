"""Task "autoencoder": LDM's KL-regularised autoencoder (``diffjax.models.AutoencoderKL``, ``diffjax.autoencoder``)
trained on ``config.data.dataset`` by the main job.

``config.autoencoder`` (``autoencoder_section``): the architecture (``latent_channels``, ``ch``, ``ch_mult``,
``num_res_blocks``, ``attn_resolutions``, ``mid_attn``, ``kernels``, ``dtype``) and the loss (``kl_weight``,
``recon`` "l1" / "l2"). ``config.model`` and ``config.diffusion`` are not used. The run draws no samples and has
no likelihood; its evaluation (end of run, ``training.eval_every``) reconstructs the first ``eval.num_examples``
test images from the posterior mean with the EMA weights and reports ``test_recon_mse`` (per pixel, images in
[-1, 1]), ``test_recon_l1``, ``test_recon_psnr`` (dB, peak-to-peak 2) and ``test_kl_per_latent_dim`` (nats).
Images enter as the training pipeline gives them: with ``data.dequantize`` (uniform noise in training) the
evaluation takes the centres of the dequantization intervals, without it the bin centres (LDM trains on clean
images: the digits config sets ``data.dequantize = False``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import autoencoder as ae
from diffjax import data as data_lib
from diffjax.models.ops import DTYPES, KERNELS
from diffjax.training.builders import _fail
from diffjax.training.tasks import TaskSpec

__all__ = ["TASK", "ARCH_FIELDS", "autoencoder_section", "build_autoencoder", "validate_section", "image_inputs"]

# the fields that define the network (a latent run's config.autoencoder must equal its autoencoder run's)
ARCH_FIELDS = ("latent_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "mid_attn", "kernels",
               "dtype")


def autoencoder_section(**fields):
    """The ``config.autoencoder`` section (its one definition) with ``fields`` replacing the defaults: a KL-f2
    autoencoder with 4 latent channels, LDM's KL weight 1e-6 and L1 reconstruction."""
    import ml_collections
    from ml_collections import config_dict

    a = ml_collections.ConfigDict()
    a.latent_channels = 4
    a.ch = 32
    a.ch_mult = (1, 2)  # f = 2^(len - 1)
    a.num_res_blocks = 1
    a.attn_resolutions = ()
    a.mid_attn = True
    a.kernels = "auto"
    a.dtype = config_dict.placeholder(str)
    a.kl_weight = 1e-6  # Rombach et al. 2022, app. G
    a.recon = "l1"
    unknown = sorted(set(fields) - set(a.keys()))
    if unknown:
        raise KeyError(f"config.autoencoder has no field(s) {unknown}; fields: {sorted(a.keys())}")
    a.update(fields)
    return a


def _int(a, name, low=1):
    v = a.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        _fail(f"autoencoder.{name}", f"must be an integer >= {low}; got {v!r}")


def validate_section(config) -> None:
    """Reject an unusable ``config.autoencoder`` (architecture and loss) or data set, naming the field."""
    a = config.get("autoencoder")
    if a is None:
        _fail("autoencoder", f"task {config.task!r} needs a config.autoencoder section "
                             f"(experiments/configs/digits_ae.py)")
    spec = data_lib.get_spec(config.data.dataset)
    if spec.kind != "image":
        _fail("data.dataset", f"an autoencoder needs images; {config.data.dataset!r} is {spec.kind} data")
    for name in ("latent_channels", "ch", "num_res_blocks"):
        _int(a, name)
    mult = a.get("ch_mult")
    if not (isinstance(mult, (tuple, list)) and mult and all(isinstance(m, int) and m >= 1 for m in mult)):
        _fail("autoencoder.ch_mult", f"must be a non-empty tuple of integers >= 1; got {mult!r}")
    try:
        ae.latent_shape(spec.shape, mult, a.latent_channels)
    except ValueError as e:
        _fail("autoencoder.ch_mult", str(e))
    res = a.get("attn_resolutions")
    if not (isinstance(res, (tuple, list)) and all(isinstance(r, int) and r >= 1 for r in res)):
        _fail("autoencoder.attn_resolutions", f"must be a tuple of feature-map heights; got {res!r}")
    if not isinstance(a.get("mid_attn"), bool):
        _fail("autoencoder.mid_attn", f"must be True or False; got {a.get('mid_attn')!r}")
    if a.get("kernels") not in KERNELS:
        _fail("autoencoder.kernels", f"must be one of {KERNELS}; got {a.get('kernels')!r}")
    if a.get("dtype") not in DTYPES:
        _fail("autoencoder.dtype", f"must be one of {DTYPES}; got {a.get('dtype')!r}")
    kl = a.get("kl_weight")
    if isinstance(kl, bool) or not (isinstance(kl, (int, float)) and kl >= 0 and math.isfinite(kl)):
        _fail("autoencoder.kl_weight", f"must be a finite number >= 0; got {kl!r}")
    if a.get("recon") not in ae.RECON_LOSSES:
        _fail("autoencoder.recon", f"must be one of {ae.RECON_LOSSES}; got {a.get('recon')!r}")


def build_autoencoder(config):
    """``AutoencoderKL`` of ``config.autoencoder`` for the images of ``config.data.dataset``."""
    from diffjax.models.autoencoder import AutoencoderKL

    a = config.autoencoder
    fields = {k: tuple(a[k]) if isinstance(a[k], (list, tuple)) else a[k] for k in ARCH_FIELDS}
    return AutoencoderKL(channels=data_lib.get_spec(config.data.dataset).shape[-1], **fields)


def init_autoencoder(module, key, x_shape):
    """The autoencoder's variables, initialised on zeros of ``x_shape`` (batch included)."""
    x = jnp.zeros(tuple(x_shape), jnp.float32)
    init = jax.jit(module.init)
    # as diffjax.models.init_params: the init graph is mostly threefry, not worth XLA's optimising passes
    return init.lower(key, x).compile(compiler_options={"xla_backend_optimization_level": 0})(key, x)


def image_inputs(config, u) -> np.ndarray:
    """n-bit test images ``u`` as the training pipeline feeds them, without its noise: the centres of the
    dequantization intervals (``data.dequantize``) or the bin centres."""
    bits = data_lib.get_spec(config.data.dataset).num_bits
    u = np.asarray(u, np.float32)
    noise = 0.5 if config.data.dequantize else None
    return np.asarray(data_lib.to_data_range(u, bits, noise))


def _build_loss(config, schedule, module):
    codec = ae.make_codec(module)
    a = config.autoencoder
    return ae.make_autoencoder_loss(functools.partial(codec.encode, train=True),
                                    functools.partial(codec.decode, train=True), kl_weight=a.kl_weight,
                                    recon=a.recon)


def _recon_stats_fn(module):
    codec = ae.make_codec(module)

    @jax.jit
    def stats(params, x):
        posterior = codec.encode(params, x)
        x_rec = codec.decode(params, posterior.mean)
        return (ae.reconstruction_error(x, x_rec, "l2"), ae.reconstruction_error(x, x_rec, "l1"),
                ae.kl_to_standard_normal(posterior))

    return stats


def evaluate(run, key) -> dict:
    """Reconstruction metrics of the EMA autoencoder on ``config.eval.num_examples`` test images (module docstring)."""
    del key  # the posterior mean: deterministic
    config = run.config
    stats = _recon_stats_fn(run.module)
    sq = ab = kl = 0.0
    count = 0
    for batch in data_lib.eval_batches(config.data.dataset, split=config.eval.split, batch_size=config.eval.batch_size,
                                       num_examples=config.eval.num_examples, data_dir=config.data.data_dir):
        x = image_inputs(config, batch["x"])
        s2, s1, k = jax.device_get(stats(run.state.ema_params, x))
        sq, ab, kl, count = sq + float(np.sum(s2)), ab + float(np.sum(s1)), kl + float(np.sum(k)), count + len(x)
    pixels = count * math.prod(run.spec.shape)
    mse = sq / pixels
    a = config.autoencoder
    latent_dims = count * math.prod(ae.latent_shape(run.spec.shape, a.ch_mult, a.latent_channels))
    return {"test_recon_mse": mse, "test_recon_l1": ab / pixels, "test_recon_psnr": float(ae.psnr(mse)),
            "test_kl_per_latent_dim": kl / latent_dims, "eval_examples": count}


def _validate(config) -> None:
    validate_section(config)


TASK = TaskSpec(build_loss=_build_loss, validate=_validate, samples=False, nll=False,
                build_model=build_autoencoder, init_params=init_autoencoder, evaluate=evaluate)
