"""Noise-conditional classifiers (model, loss, training task, guidance hook), the time budget, and the
independent digits evaluator."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import evaluators, guidance
from diffjax.config import load
from diffjax.losses import make_classifier_loss
from diffjax.models import EncoderClassifier, UNet, init_params, make_model_fn
from diffjax.schedules import VPLinear
from diffjax.testing.gmm import ring_mixture
from diffjax.training.builders import ConfigError, validate_config
from diffjax.training.loop import train, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RING = ring_mixture()


def oracle_logits(schedule, scale=1.0):
    """Exact log p(y | x_t) of the ring (Bayes' rule on the noised mixture), times ``scale``."""
    def logits(params, x, t, cond=None):
        comps = jnp.stack([RING.log_prob_t(x, schedule, t, jnp.full((x.shape[0],), k))
                           for k in range(RING.num_components)], axis=1)
        return scale * (comps + jnp.log(RING.weights))
    return logits


def test_encoder_classifier_shapes_and_shared_encoder():
    clf = EncoderClassifier(ch=8, ch_mult=(1, 2), num_res_blocks=1, out_channels=10)
    params = init_params(clf, jax.random.PRNGKey(0), (3, 8, 8, 1))
    logits = make_model_fn(clf)(params, jnp.ones((3, 8, 8, 1)), jnp.full((3,), 0.5))
    assert logits.shape == (3, 10)
    np.testing.assert_allclose(logits, 0.0)  # zero-initialised head: uniform at init
    unet = init_params(UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0),
                       jax.random.PRNGKey(0), (1, 8, 8, 1))
    shared = set(params["params"]) - {"norm_out", "head"}
    assert shared and shared <= set(unet["params"])  # the U-Net's down path and middle block, same names


@pytest.mark.parametrize("fields, match", [
    (dict(out_channels=None), "out_channels = the number of classes"),
    (dict(out_channels=10, num_classes=10), "num_classes must be None"),
])
def test_encoder_classifier_bad_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        EncoderClassifier(ch=8, **fields)


def test_classifier_loss_prefers_the_exact_classifier():
    """Cross-entropy on x_t ~ q: the Bayes classifier p(y | x_t) beats a tempered copy of it."""
    s = VPLinear()
    x0, y = RING.sample(jax.random.PRNGKey(0), 4096)
    batch = {"x": x0, "label": y}
    key = jax.random.PRNGKey(1)
    exact = make_classifier_loss(oracle_logits(s), s, num_classes=8)(None, batch, key)
    for scale in (0.5, 2.0):
        other = make_classifier_loss(oracle_logits(s, scale), s, num_classes=8)(None, batch, key)
        assert exact[0] < other[0]
    # over t ~ U[t_min, 1] the Bayes classifier is well above chance (1/8) but far from perfect
    assert exact[1]["correct"].shape == (4096,) and 0.25 < float(jnp.mean(exact[1]["correct"])) < 0.9


def test_classifier_loss_bad_input():
    s = VPLinear()
    x0, y = RING.sample(jax.random.PRNGKey(0), 8)
    loss = make_classifier_loss(oracle_logits(s), s, num_classes=8)
    with pytest.raises(ValueError, match="no 'label'"):
        loss(None, {"x": x0}, jax.random.PRNGKey(0))
    wrong = make_classifier_loss(oracle_logits(s), s, num_classes=10)
    with pytest.raises(ValueError, match=r"classifier output shape \(8, 8\) does not match .* \(8, 10\)"):
        wrong(None, {"x": x0, "label": y}, jax.random.PRNGKey(0))


def test_classifier_log_prob_hook():
    s = VPLinear()
    x, _ = RING.sample_t(jax.random.PRNGKey(0), 16, s, 0.3)
    t = jnp.full((16,), 0.3)
    y = jnp.arange(16) % 8
    logits_fn = jax.tree_util.Partial(oracle_logits(s), None)
    lp = guidance.classifier_log_prob(logits_fn)(x, t, y)
    want = jax.nn.log_softmax(logits_fn(x, t), -1)[jnp.arange(16), y]
    np.testing.assert_allclose(lp, want, rtol=1e-6)
    with pytest.raises(ValueError, match=r"cond must lie in \[0, 8\)"):
        guidance.classifier_log_prob(logits_fn)(x, t, y + 3)
    with pytest.raises(ValueError, match=r"logits of shape \(batch, num_classes\) = \(16, K\); got shape \(16,\)"):
        guidance.classifier_log_prob(lambda x, t: jnp.sum(x, -1))(x, t, y)


def toy_classifier_config(steps=300):
    c = load(os.path.join(REPO, "experiments", "configs", "toy2d.py"))
    c.task, c.model.name, c.model.width, c.model.depth = "classifier", "mlp", 64, 2
    c.training.batch_size, c.training.num_steps, c.training.log_every = 128, steps, 50
    c.training.checkpoint_every = steps
    c.optim.learning_rate, c.optim.warmup_steps, c.optim.ema_decay = 3e-3, 10, 0.9
    c.eval.num_examples, c.eval.batch_size = 2000, 1000
    return c


def test_classifier_task_trains_end_to_end(tmp_path):
    """config.task = 'classifier' through the main job: on the ring (8 separated modes) the classifier
    is near-perfect on clean data and falls to chance as t -> t_max."""
    m = train_and_evaluate(toy_classifier_config(), str(tmp_path), progress=False)
    assert m["test_accuracy_t0.001"] > 0.97
    assert m["test_accuracy_t0.75"] < m["test_accuracy_t0.25"] <= m["test_accuracy_t0.001"]
    assert 0 < m["test_xent"] < np.log(8)
    assert os.path.exists(tmp_path / "metrics.json") and os.path.exists(tmp_path / "loss_curve.png")


@pytest.mark.parametrize("field, value, match", [
    ("task", "segmentation", "config.task: must be one of"),
    ("model.name", "unet", "config.model.name: task 'classifier' trains one of"),
    ("model.num_classes", 8, "config.model.num_classes: must be None for task 'classifier'"),
    ("data.dataset", "checkerboard", "needs labelled data"),
    ("model.out_dim", 3, "config.model.out_dim: 3 != the 8 classes"),
])
def test_classifier_config_errors_name_the_field(field, value, match):
    c = toy_classifier_config()
    section, _, name = field.rpartition(".")
    (c[section] if section else c)[name] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(c, 1)


def test_max_train_seconds_stops_training(tmp_path):
    c = toy_classifier_config(steps=10**6)
    c.training.max_train_seconds = 3.0
    c.training.checkpoint_every = 10**6
    run, summary = train(c, str(tmp_path), progress=False)
    assert summary["budget_stopped"] and 0 < summary["step"] < 10**6
    assert run.checkpointer.latest_step() == summary["step"]  # the stopped state is saved
    c.training.max_train_seconds = -1.0
    with pytest.raises(ConfigError, match="training.max_train_seconds: must be > 0"):
        validate_config(c, 1)


@pytest.fixture(scope="module")
def small_evaluator():
    return evaluators.train_digits_evaluator(steps=300)


def test_digits_evaluator_learns_from_the_train_split(small_evaluator, tmp_path):
    """A short run already classifies the held-out test split well (the full run: ~99%, in BENCHMARKS)."""
    assert small_evaluator.info["test_accuracy"] > 0.85
    x, y = evaluators._split_arrays("test", None)
    feats = small_evaluator.features(x[:20])
    assert feats.shape == (20, 64) and np.all(np.isfinite(feats))
    np.testing.assert_array_equal(np.argmax(small_evaluator.logits(x[:20]), -1) == y[:20],
                                  np.argmax(small_evaluator.logits(x[:20]), -1) == y[:20])


def test_digits_evaluator_bad_input(small_evaluator):
    with pytest.raises(ValueError, match=r"images must have shape \(N, 8, 8, 1\).*got \(2, 8, 8\)"):
        small_evaluator.features(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="images must be uint8.*float32"):
        small_evaluator.features(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        small_evaluator.accuracy(np.zeros((2, 8, 8, 1), np.uint8), np.zeros(3))


def test_digits_evaluator_cache_round_trip(small_evaluator, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluators, "train_digits_evaluator", lambda data_dir=None: small_evaluator)
    first = evaluators.digits_evaluator(cache_dir=str(tmp_path))
    monkeypatch.setattr(evaluators, "train_digits_evaluator", lambda data_dir=None: pytest.fail("retrained"))
    again = evaluators.digits_evaluator(cache_dir=str(tmp_path))
    x, _ = evaluators._split_arrays("test", None)
    np.testing.assert_array_equal(first.features(x[:8]), again.features(x[:8]))
    assert again.info == first.info
