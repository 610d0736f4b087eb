"""EMA warm-up: the decay of each update is min(d, (1 + n) / (10 + n)) after n updates, and a run resumed from a
checkpoint continues it exactly (the restored step count, not a restarted one, sets the decay)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from ml_collections import config_dict

from diffjax.config import base
from diffjax.training import make_train_step
from diffjax.training.builders import build_optimizer
from diffjax.training.loop import setup, train

DECAY = 0.5  # the warm-up (1 + n) / (10 + n) reaches it at n = 8: 12 updates cover both branches
STEPS = 12


def warm_decay(n):
    return min(DECAY, (1.0 + n) / (10.0 + n))  # TF ExponentialMovingAverage(num_updates=n), diffusers EMAModel


def implied_decay(ema_old, ema_new, params):
    """d of ema_new = d ema_old + (1 - d) params, solved over every leaf element (least squares)."""
    a = np.concatenate([np.ravel(e - p) for e, p in zip(jax.tree.leaves(ema_old), jax.tree.leaves(params))])
    b = np.concatenate([np.ravel(e - p) for e, p in zip(jax.tree.leaves(ema_new), jax.tree.leaves(params))])
    return float(a @ b / (a @ a))


@pytest.fixture(scope="module")
def config():
    c = base()
    c.data.dataset = "ring"
    c.data.dequantize = False
    c.model = ml_collections.ConfigDict({"name": "mlp", "width": 16, "depth": 2, "dropout": 0.0,
                                         "num_classes": config_dict.placeholder(int)})
    c.training.update(batch_size=16, num_steps=STEPS, log_every=6, checkpoint_every=1000)
    c.optim.update(learning_rate=3e-2, warmup_steps=0, ema_decay=DECAY, ema_warmup=True)
    return c


def test_each_update_uses_the_warmup_decay(config):
    """The decay implied by each of 12 updates of a jitted step equals min(d, (1 + n) / (10 + n)) to round-off."""
    run = setup(config, None)
    step = make_train_step(lambda p, b, k: (sum(jnp.sum((q - 1.0) ** 2) for q in jax.tree.leaves(p)), None),
                           build_optimizer(config), ema_decay=DECAY, ema_warmup=True, donate=False)
    state, batch = run.state, {"x": jnp.zeros((16, 2))}
    measured = []
    for _ in range(STEPS):
        new, _ = step(state, batch)
        measured.append(implied_decay(state.ema_params, new.ema_params, new.params))
        state = new
    expected = [warm_decay(n) for n in range(STEPS)]
    np.testing.assert_allclose(measured, expected, rtol=1e-5, atol=1e-6)
    assert expected[0] == 0.1 and expected[-1] == DECAY and min(np.diff(expected)) >= 0


def test_resumed_run_continues_the_warmup_exactly(config, tmp_path):
    """Stop at step 5, resume for one step (its decay is 6/15, not the restarted 1/10), then to 12: the EMA equals
    that of an uninterrupted 12-step run bitwise."""
    full, _ = train(config, str(tmp_path / "full"), progress=False)
    resumed_dir = str(tmp_path / "resumed")
    at5, first = train(config, resumed_dir, progress=False, stop_after=5)
    assert first["step"] == 5
    ema5 = jax.tree.map(np.asarray, at5.state.ema_params)
    at6, second = train(config, resumed_dir, progress=False, stop_after=1)
    assert second["start_step"] == 5 and second["step"] == 6
    d = implied_decay(ema5, at6.state.ema_params, at6.state.params)
    assert d == pytest.approx(warm_decay(5), rel=1e-5) and abs(d - warm_decay(0)) > 0.2
    end, third = train(config, resumed_dir, progress=False)
    assert third["start_step"] == 6 and third["step"] == STEPS
    for a, b in zip(jax.tree.leaves(full.state.ema_params), jax.tree.leaves(end.state.ema_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(ema5), jax.tree.leaves(end.state.ema_params)))
