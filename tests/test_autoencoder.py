"""The KL autoencoder's math (diffjax.autoencoder), network shapes (diffjax.models.AutoencoderKL) and config checks."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import autoencoder as ae
from diffjax.config import load
from diffjax.models.autoencoder import AutoencoderKL
from diffjax.training.builders import ConfigError, validate_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")


def test_kl_matches_hand_calculation():
    # one example, two latent dims: mu = (1, 0), sigma^2 = (1, e): 1/2 [(1 + 1 - 1 - 0) + (0 + e - 1 - 1)]
    post = ae.Posterior(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]]))
    expected = 0.5 * (1.0 + (math.e - 2.0))
    np.testing.assert_allclose(ae.kl_to_standard_normal(post), [expected], rtol=1e-6)
    # zero exactly at the prior
    zero = ae.Posterior(jnp.zeros((3, 2, 2, 4)), jnp.zeros((3, 2, 2, 4)))
    np.testing.assert_array_equal(ae.kl_to_standard_normal(zero), np.zeros(3))


def test_kl_matches_monte_carlo():
    """E_q[log q(z) - log p(z)] from 200k posterior samples agrees with the closed form within 5 standard errors."""
    mu = jnp.array([[0.7, -1.2, 0.1]])
    logvar = jnp.array([[-1.0, 0.5, 0.0]])
    post = ae.Posterior(mu, logvar)
    z = jax.vmap(lambda k: ae.posterior_sample(k, post))(jax.random.split(jax.random.PRNGKey(0), 200_000))[:, 0]
    var = jnp.exp(logvar[0])
    log_q = -0.5 * jnp.sum((z - mu[0]) ** 2 / var + logvar[0] + jnp.log(2 * jnp.pi), axis=-1)
    log_p = -0.5 * jnp.sum(z ** 2 + jnp.log(2 * jnp.pi), axis=-1)
    d = np.asarray(log_q - log_p, np.float64)
    stderr = d.std() / math.sqrt(d.size)
    assert abs(d.mean() - float(ae.kl_to_standard_normal(post)[0])) < 5 * stderr


def test_posterior_sample_moments():
    post = ae.Posterior(jnp.full((1, 50_000), 2.0), jnp.full((1, 50_000), math.log(0.25)))
    z = np.asarray(ae.posterior_sample(jax.random.PRNGKey(1), post))
    assert abs(z.mean() - 2.0) < 5 * 0.5 / math.sqrt(z.size)
    assert abs(z.std() - 0.5) < 0.01


def test_reconstruction_error_and_loss():
    rng = np.random.default_rng(0)
    x, x_rec = rng.normal(size=(2, 4, 4, 1)).astype(np.float32), rng.normal(size=(2, 4, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(ae.reconstruction_error(x, x_rec, "l1"), np.abs(x - x_rec).sum((1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(ae.reconstruction_error(x, x_rec, "l2"), ((x - x_rec) ** 2).sum((1, 2, 3)), rtol=1e-5)
    post = ae.Posterior(jnp.ones((2, 2, 2, 3)), jnp.zeros((2, 2, 2, 3)))  # KL = 1/2 x 12 per example
    loss, aux = ae.autoencoder_loss(x, x_rec, post, kl_weight=0.1, recon="l1")
    np.testing.assert_allclose(loss, np.abs(x - x_rec).sum((1, 2, 3)).mean() + 0.1 * 6.0, rtol=1e-5)
    np.testing.assert_allclose(aux["kl"], 6.0, rtol=1e-6)
    with pytest.raises(ValueError, match="recon"):
        ae.reconstruction_error(x, x_rec, "l3")


def test_psnr():
    np.testing.assert_allclose(ae.psnr(0.04), 20.0, rtol=1e-6)  # 10 log10(2^2 / 0.04)


def test_scale_factor_gives_unit_variance():
    """Synthetic latents of known std 3.7: the estimate is 1 / 3.7 up to sampling error and scales them to std 1."""
    z = 0.3 + 3.7 * jax.random.normal(jax.random.PRNGKey(2), (64, 4, 4, 4))
    s = float(ae.scale_factor(z))
    n = z.size
    assert abs(s - 1 / 3.7) < 5 * (1 / 3.7) / math.sqrt(2 * n)  # std of a sample std: sigma / sqrt(2n)
    np.testing.assert_allclose(np.std(np.asarray(z) * s), 1.0, rtol=1e-5)


@pytest.mark.parametrize("ch_mult,f", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4)])
def test_encode_decode_shapes(ch_mult, f):
    module = AutoencoderKL(channels=3, latent_channels=3, ch=8, ch_mult=ch_mult, num_res_blocks=1)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)  # abstract evaluation: shapes without compute
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    codec = ae.make_codec(module)
    post = jax.eval_shape(codec.encode, params, x)
    assert post.mean.shape == post.logvar.shape == (2, 8 // f, 8 // f, 3)
    assert ae.latent_shape((8, 8, 3), ch_mult, 3) == (8 // f, 8 // f, 3)
    assert jax.eval_shape(codec.decode, params, post.mean).shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="latents"):
        jax.eval_shape(codec.decode, params, jax.ShapeDtypeStruct((2, 4, 4, 5), jnp.float32))


@pytest.mark.parametrize("field,value", [
    ("autoencoder.kl_weight", -1.0),
    ("autoencoder.recon", "l3"),
    ("autoencoder.latent_channels", 0),
    ("autoencoder.ch_mult", (1, 1, 1, 1, 1)),  # f = 16 does not divide 8
    ("autoencoder.kernels", "gpu"),
    ("autoencoder.dtype", "float16"),
])
def test_bad_autoencoder_field_names_it(field, value):
    c = load(os.path.join(CONFIGS, "digits_ae.py"))
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=f"config.{field}"):
        validate_config(c, 1)


@pytest.mark.parametrize("field,value", [
    ("latent.autoencoder_workdir", ""),
    ("latent.scale_factor", -1.0),
    ("latent.scale_batches", 0),
    ("model.name", "mlp"),
])
def test_bad_latent_field_names_it(field, value):
    c = load(os.path.join(CONFIGS, "digits_latent_unet.py"))
    section, name = field.split(".")
    with c.unlocked():
        c[section][name] = value
    with pytest.raises(ConfigError, match=f"config.{field}"):
        validate_config(c, 1)


def test_latent_configs_validate():
    for name, shape in (("digits_ae.py", (8, 8, 1)), ("digits_latent_unet.py", (4, 4, 2)),
                        ("digits_latent_dit.py", (4, 4, 2))):
        c = load(os.path.join(CONFIGS, name))
        validate_config(c, 1)
        from diffjax.training.builders import model_shape

        assert model_shape(c) == shape


def test_imagenet256_center_square_resize():
    """The ImageNet data set's preprocessing: the central square of a landscape image, bicubic to 256 x 256."""
    from diffjax.data.images import IMAGE_DATASETS, center_square_resize

    image = np.zeros((300, 400, 3), np.uint8)
    image[:, 50:350] = 200  # the central 300 x 300 square is uniform; the side bands are cut off
    out = center_square_resize(image)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8 and (out == 200).all()
    assert IMAGE_DATASETS["imagenet256"].spec.shape == (256, 256, 3)


def test_imagenet256_dit_xl2_config():
    """The pod config validates on 8 devices with the paper's settings; DiT-XL/2 sees 32x32x4 latents and returns
    eps and the variance interpolation (8 channels), checked by abstract evaluation."""
    from diffjax.training.builders import build_model, model_shape

    path = os.path.join(CONFIGS, "imagenet256_dit_xl2.py")
    c = load(path)
    validate_config(c, 8)
    assert c.task == "latent_diffusion" and model_shape(c) == (32, 32, 4)
    assert (c.model.depth, c.model.hidden_size, c.model.num_heads, c.model.patch_size) == (28, 1152, 16, 2)
    assert (c.optim.optimizer, c.optim.learning_rate, c.optim.weight_decay, c.optim.ema_decay) == \
        ("adamw", 1e-4, 0.0, 0.9999)
    assert (c.training.batch_size, c.training.num_steps) == (256, 400_000)
    assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.diffusion.prediction) == ("ddpm_linear", 1000, "eps")
    assert c.diffusion.learned_variance and c.diffusion.cond_drop_prob == 0.1 and c.model.num_classes == 1000
    assert c.latent.autoencoder_workdir
    module = build_model(c)
    x = jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32)
    t, y = jax.ShapeDtypeStruct((2,), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t, y)
    assert jax.eval_shape(module.apply, params, x, t, y).shape == (2, 32, 32, 8)
    import importlib.util

    spec = importlib.util.spec_from_file_location("imagenet_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ae_config = mod.get_config("autoencoder")
    validate_config(ae_config, 8)
    assert ae_config.task == "autoencoder" and ae_config.autoencoder.to_dict() == c.autoencoder.to_dict()
