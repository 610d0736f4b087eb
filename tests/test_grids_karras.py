"""Time grids by name: Karras (EDM eq. 5), the aliases of other libraries' names, diffusers' leading spacing."""

import numpy as np
import pytest

import diffjax
from diffjax.timesteps import (
    GRID_ALIASES, discrete_subsequence, karras, logsnr_uniform, make_grid, parse_grid, time_uniform,
)

VP = diffjax.VPLinear()


def _edm_eq5(s_max, s_min, n, rho):
    """EDM eq. 5 as printed: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, N = n + 1."""
    i = np.arange(n + 1)
    return (s_max ** (1 / rho) + i / n * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


def test_karras_grid_is_edm_eq5_in_sigma_over_alpha():
    t_start, t_end = 0.95, 0.02
    for schedule, rho in ((diffjax.VPLinear(), 7.0), (diffjax.VE(), 7.0), (diffjax.VPCosine(), 3.0)):
        ts = np.asarray(karras(schedule, t_start, t_end, 9, rho), np.float64)
        s = np.exp(-np.asarray(schedule.log_snr(ts), np.float64))
        s_max, s_min = (float(np.exp(-schedule.log_snr(t))) for t in (t_start, t_end))
        np.testing.assert_allclose(s, _edm_eq5(s_max, s_min, 9, rho), rtol=2e-4)
        assert ts[0] == np.float32(t_start) and ts[-1] == np.float32(t_end)
        assert np.all(np.diff(ts) < 0)


def test_grid_strings_and_aliases():
    """'karras:rho=r' passes rho; log_sigma is logSNR (log(sigma/alpha) = -lambda) and linspace is time_uniform."""
    np.testing.assert_array_equal(make_grid(VP, 1.0, 1e-3, 6, "karras:rho=3"), karras(VP, 1.0, 1e-3, 6, 3.0))
    np.testing.assert_array_equal(make_grid(VP, 1.0, 1e-3, 6, "karras"), karras(VP, 1.0, 1e-3, 6, 7.0))
    np.testing.assert_array_equal(make_grid(VP, 1.0, 1e-3, 6, "log_sigma"), logsnr_uniform(VP, 1.0, 1e-3, 6))
    np.testing.assert_array_equal(make_grid(VP, 1.0, 1e-3, 6, "linspace"), time_uniform(1.0, 1e-3, 6))
    assert GRID_ALIASES == {"log_sigma": "logSNR", "linspace": "time_uniform", "leading": "ddim_leading"}
    # k-diffusion's get_sigmas_exponential: sigma uniform in log between the ends
    s = np.exp(-np.asarray(VP.log_snr(make_grid(VP, 0.9, 0.01, 5, "log_sigma")), np.float64))
    np.testing.assert_allclose(np.diff(np.log(s)), np.full(5, np.log(s[-1] / s[0]) / 5), rtol=1e-4)


def _diffusers_leading(n_train, n, steps_offset):
    """diffusers DDIMScheduler.set_timesteps, timestep_spacing="leading" (0-based steps)."""
    step_ratio = n_train // n
    return (np.arange(0, n) * step_ratio).round()[::-1].astype(np.int64) + steps_offset


@pytest.mark.parametrize("n, offset", [(10, 0), (7, 0), (7, 1), (50, 1)])
def test_leading_is_diffusers_leading(n, offset):
    d = diffjax.DiscreteDDPM.linear()
    ts = np.asarray(make_grid_for(d, n, f"leading:steps_offset={offset}"))
    np.testing.assert_allclose(ts[:-1] * 1000, _diffusers_leading(1000, n, offset) + 1, atol=1e-3)
    assert ts[-1] == 0.0
    linear = np.asarray(discrete_subsequence(d, n, "linear"))
    # DDIM's linear sub-sequence equals it exactly when N mod S <= 1 (offset 0), and only then
    assert np.array_equal(linear, ts) == (offset == 0 and 1000 % n <= 1)


def make_grid_for(schedule, n, grid):
    """The grid ``sample`` lays for ``grid`` to t = 0 (through its _grid)."""
    from diffjax.samplers.api import SAMPLERS, _grid

    return _grid(schedule, SAMPLERS["ddim"], n, 1.0, 0.0, grid, {}, True)


def test_karras_through_sample_ends_at_zero_like_k_diffusion():
    """grid='karras' to t = 0: num_steps sigmas from s(t_max) to s(t_min), then sigma = 0 (get_sigmas_karras(n))."""
    ts = np.asarray(make_grid_for(VP, 8, "karras"), np.float64)
    assert ts.shape == (9,) and ts[-1] == 0.0
    s = np.exp(-np.asarray(VP.log_snr(ts[:-1]), np.float64))
    np.testing.assert_allclose(s, _edm_eq5(s[0], s[-1], 7, 7.0), rtol=2e-4)


@pytest.mark.parametrize("grid, match", [
    ("karras:rho=x", "rho must be a float"), ("karras:beta=2", "takes options"), ("sigmoid", "grid must be one of"),
    ("logSNR:rho=2", "takes options"), ("karras:rho=-1", "rho must be positive"),
])
def test_bad_grid_names(grid, match):
    with pytest.raises(ValueError, match=match):
        make_grid(VP, 1.0, 1e-3, 4, grid)


def test_karras_needs_finite_sigma_over_alpha():
    with pytest.raises(ValueError, match="0 < sigma/alpha < inf"):
        karras(diffjax.VPCosine(), 1.0, 1e-3, 4)  # alpha(1) = 0
    assert parse_grid("leading:steps_offset=1") == ("ddim_leading", {"steps_offset": 1})
    with pytest.raises(ValueError, match="passes the chain's last step"):
        discrete_subsequence(diffjax.DiscreteDDPM.linear(10), 10, "leading", 1)
