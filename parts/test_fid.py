"""
Tests of fid.py: the Frechet distance against closed forms and an independent square root, the resize
convention against a transcription of TF1's resize_bilinear, the detector's shape, determinism and value
range, and the .npz / folder layouts. Run with

    python -m pytest -q parts/test_fid.py

The Inception forward pass costs ~6 GFLOP per image (0.1-0.2 s on a CPU core pair), so only a few tiny
images go through it; everything about the distance runs on small matrices drawn by hypothesis.
"""

import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fid  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "digits.npz")


# ================================================================================================
# The Frechet distance
# ================================================================================================

def _random_rotation(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _random_spd2(rng, lo=0.1, hi=10.0):
    """A 2 x 2 symmetric positive definite matrix with eigenvalues in [lo, hi], random axes."""
    R = _random_rotation(rng, 2)
    return (R * rng.uniform(lo, hi, 2)) @ R.T


@settings(max_examples=40, deadline=None)
@given(blocks=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_frechet_distance_matches_closed_form_for_2x2_blocks(blocks, seed):
    """Non-commuting covariances with a closed form. For 2 x 2 SPD S1, S2 the eigenvalues l1, l2 of
    S1 S2 are positive and (sqrt l1 + sqrt l2)^2 = tr(S1 S2) + 2 sqrt(det S1 det S2), so
    tr((S1 S2)^1/2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)). Block-diagonal matrices add these up, and a
    common rotation of both Gaussians leaves the distance unchanged (it hides the block structure)."""
    rng = np.random.default_rng(seed)
    d = 2 * blocks
    S1, S2 = np.zeros((d, d)), np.zeros((d, d))
    cross = 0.0
    for k in range(blocks):
        A, B = _random_spd2(rng), _random_spd2(rng)
        S1[2 * k:2 * k + 2, 2 * k:2 * k + 2], S2[2 * k:2 * k + 2, 2 * k:2 * k + 2] = A, B
        cross += np.sqrt(np.trace(A @ B) + 2 * np.sqrt(np.linalg.det(A) * np.linalg.det(B)))
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * cross
    R = _random_rotation(rng, d)
    got = fid.frechet_distance(R @ mu1, R @ S1 @ R.T, R @ mu2, R @ S2 @ R.T)
    # float64 eigen/singular values of matrices with condition <= 100 and entries <= 10: errors ~1e-13
    # of the scale; 1e-9 leaves room and still catches any wrong factor or missing term.
    scale = np.trace(S1) + np.trace(S2) + np.sum((mu1 - mu2) ** 2)
    assert abs(got - expected) <= 1e-9 * scale, (got, expected)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 12), zeros=st.integers(0, 6), seed=st.integers(0, 2**31 - 1))
def test_frechet_distance_commuting_singular_covariances(d, zeros, seed):
    """Diagonal covariances, some variances exactly 0 (the singular case ADM patches with eps):
    FD = |mu1 - mu2|^2 + sum_i (sqrt a_i - sqrt b_i)^2."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 5, d), rng.uniform(0, 5, d)
    a[:min(zeros, d)] = 0.0
    b[d - min(zeros, d) // 2:] = 0.0
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    R = _random_rotation(rng, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(R @ mu1, (R * a) @ R.T, R @ mu2, (R * b) @ R.T)
    # A zero eigenvalue comes back as +-1e-16 |S| and its square root as ~1e-8 |S|^1/2, which enters the
    # cross term linearly: hence 1e-6 of the scale here rather than 1e-9.
    assert abs(got - expected) <= 1e-6 * (1 + a.sum() + b.sum() + np.sum((mu1 - mu2) ** 2))


def test_frechet_distance_agrees_with_scipy_sqrtm():
    """The ADM / pytorch-fid formula with scipy.linalg.sqrtm, on full-rank covariances (where sqrtm is
    reliable). scipy is not a project dependency: skipped where it is missing."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    for d in (3, 16, 64):
        X, Y = rng.standard_normal((4 * d, d)), rng.standard_normal((4 * d, d)) @ rng.standard_normal((d, d))
        (mu1, S1), (mu2, S2) = fid.feature_stats(X), fid.feature_stats(Y + 1.0)
        ref = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * np.trace(scipy_linalg.sqrtm(S1 @ S2).real)
        assert fid.frechet_distance(mu1, S1, mu2, S2) == pytest.approx(ref, rel=1e-8)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(2, 24), n1=st.integers(2, 30), n2=st.integers(2, 30), seed=st.integers(0, 2**31 - 1))
def test_fid_from_features_sample_space_path_matches_covariance_path(d, n1, n2, seed):
    """fid_from_features works in sample space when both sets are smaller than D; it must give the
    covariance formula's number (which runs when a set is larger: that branch is the reference)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n1, d)) @ rng.standard_normal((d, d))
    b = rng.standard_normal((n2, d)) + rng.standard_normal(d)
    got = fid.fid_from_features(a, b)
    ref = fid.frechet_distance(*fid.feature_stats(a), *fid.feature_stats(b))
    (mu1, S1), (mu2, S2) = fid.feature_stats(a), fid.feature_stats(b)
    # Both are float64; the covariance path loses up to ~1e-8 |S| per null direction (see the test
    # above), so compare at 1e-6 of the scale.
    assert abs(got - ref) <= 1e-6 * (np.trace(S1) + np.trace(S2) + np.sum((mu1 - mu2) ** 2))


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(41, 120), seed=st.integers(0, 2**31 - 1))
def test_fid_of_a_set_against_itself_is_zero(n, d, seed):
    """FID(X, X) = 0 by both paths, also when the covariance is very singular (n << d), the case of a
    thousand samples in 2048 dimensions. Features are nonnegative like Inception's pool_3."""
    x = np.abs(np.random.default_rng(seed).standard_normal((n, d)))
    scale = np.trace(np.cov(x, rowvar=False))
    assert abs(fid.fid_from_features(x, x)) <= 1e-10 * scale
    # The covariance path squares nothing but does take square roots of zero eigenvalues (+-1e-16 |S|,
    # giving ~1e-8 |S|^1/2 each): d of them at most.
    assert abs(fid.frechet_distance(*fid.feature_stats(x), *fid.feature_stats(x))) <= 1e-7 * d * (1 + scale)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ================================================================================================
# The resize convention
# ================================================================================================

def _tf1_resize_bilinear_reference(img, size):
    """TF1 tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False), transcribed in
    numpy float64: output (i, j) reads input (i H / size, j W / size), bilinear, indices clamped."""
    H, W = img.shape[-2:]
    def axis(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo
    y0, y1, wy = axis(H)
    x0, x1, wx = axis(W)
    top = img[..., y0, :][..., x0] * (1 - wx) + img[..., y0, :][..., x1] * wx
    bot = img[..., y1, :][..., x0] * (1 - wx) + img[..., y1, :][..., x1] * wx
    return top * (1 - wy)[:, None] + bot * wy[:, None]


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), size=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_resize_is_tf1_bilinear(h, w, size, seed):
    img = np.random.default_rng(seed).uniform(0, 255, (2, 3, h, w))
    got = fid.resize_tf1_bilinear(torch.from_numpy(img).float(), size).double().numpy()
    # float32 coordinates: error ~1e-7 * (h or w) pixels, times a slope <= 255 per pixel, plus float32
    # rounding of values <= 255 (1.5e-5): 1e-3 is ample and far below what a half-pixel shift moves.
    np.testing.assert_allclose(got, _tf1_resize_bilinear_reference(img, size), atol=1e-3, rtol=0)


def test_resize_differs_from_half_pixel_interpolate():
    """The convention is not a detail: pytorch-fid's F.interpolate (half-pixel centres) moves an 8x8
    image's upsampling by many grey levels. Guards against someone "simplifying" the resize."""
    img = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (1, 3, 8, 8))).float()
    half_pixel = torch.nn.functional.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
    assert (fid.resize_tf1_bilinear(img) - half_pixel).abs().max() > 10


# ================================================================================================
# The detector
# ================================================================================================

@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def features(images):
    return fid.inception_features(images, batch_size=3)


def test_inception_features_shape_dtype_determinism(images, features):
    assert features.shape == (3, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all() and (features >= 0).all()        # pool_3 follows a ReLU
    np.testing.assert_array_equal(fid.inception_features(images, batch_size=3), features)   # same call
    # Another batch size may pick other float32 conv kernels: agreement to float32 round-off, relative
    # to the largest feature (~1e-6 seen; 1e-4 allows for other CPUs' kernels).
    by_one = fid.inception_features(images, batch_size=1)
    assert np.abs(by_one - features).max() <= 1e-4 * np.abs(features).max()
    # ... and different images give different features (a constant output would pass the above).
    assert np.abs(features[0] - features[1]).max() > 1e-2 * np.abs(features).max()


def test_inception_value_range_is_minus_128_over_128():
    """A constant image v stays v through any bilinear resize; the network must then see (v - 128)/128.
    Pins the value-range convention: pytorch-fid's 2 v / 255 - 1 (inputs differ by up to 1/128) moves
    these features by 8e-3 of their maximum, float32 round-off (resize weights, conv kernels for other
    strides) by ~1e-5; the tolerance 1e-4 sits between."""
    v = np.array([[[[10, 200, 255]]]], dtype=np.uint8) * np.ones((1, 5, 7, 3), dtype=np.uint8)
    x = (torch.tensor([10.0, 200.0, 255.0]) - 128) / 128
    with torch.inference_mode():
        direct = fid.load_inception("cpu")(x.reshape(1, 3, 1, 1).expand(1, 3, 299, 299).contiguous())
    direct = direct.double().numpy()
    assert np.abs(fid.inception_features(v) - direct).max() <= 1e-4 * np.abs(direct).max()


def test_inception_rejects_wrong_images():
    with pytest.raises(TypeError, match="uint8"):
        fid.inception_features(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="np.repeat"):
        fid.inception_features(np.zeros((1, 8, 8, 1), dtype=np.uint8))


def test_fid_separates_digits_from_noise():
    """The detector sees images: two disjoint sets of digits are much closer to each other than digits
    are to uniform noise. 8 images per set keeps this to ~24 forward passes."""
    with np.load(DIGITS) as f:
        digits = f["images"]
    rgb = np.repeat((digits.astype(np.float64) * 255 / 16).round().astype(np.uint8)[..., None], 3, axis=-1)
    noise = np.random.default_rng(0).integers(0, 256, size=(8, 8, 8, 3), dtype=np.uint8)
    fa, fb, fn = (fid.inception_features(x, batch_size=8) for x in (rgb[:8], rgb[8:16], noise))
    assert fid.fid_from_features(fa, fb) < 0.5 * fid.fid_from_features(fa, fn)


# ================================================================================================
# Layouts: ADM .npz, statistics .npz, folders
# ================================================================================================

@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 5), h=st.integers(1, 12), w=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_adm_npz_round_trip(tmp_path_factory, n, h, w, seed):
    x = np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    path = str(tmp_path_factory.mktemp("npz") / "samples.npz")
    fid.save_images_npz(path, x)
    with np.load(path) as f:                       # exactly what ADM's evaluator reads
        assert f.files == ["arr_0"] and f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_0"], x)
    np.testing.assert_array_equal(fid.load_images_npz(path), x)


def test_stats_npz_round_trip_and_sources(tmp_path, images, features):
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(2048), np.cov(rng.standard_normal((50, 2048)), rowvar=False)
    fid.save_stats(str(tmp_path / "stats.npz"), mu, sigma)
    mu2, sigma2 = fid.stats_from_npz(str(tmp_path / "stats.npz"))
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # A file shaped like ADM's VIRTUAL_imagenet256_labeled.npz (reference images for precision/recall,
    # mu/sigma over the whole training set, spatial mu_s/sigma_s for sFID): mu and sigma are what FID uses.
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:7], sigma_s=np.eye(7))
    mu3, sigma3 = fid.stats_from_source(str(tmp_path / "adm.npz"))
    np.testing.assert_array_equal(mu3, mu)
    np.testing.assert_array_equal(sigma3, sigma)
    # An image .npz and a folder of PNGs give the statistics of their images.
    from PIL import Image
    fid.save_images_npz(str(tmp_path / "imgs.npz"), images)
    os.makedirs(tmp_path / "folder")
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "folder" / f"{i:06d}.png")
    np.testing.assert_array_equal(fid.load_images_folder(str(tmp_path / "folder")), images)
    mu_f, sigma_f = fid.feature_stats(features)
    for source in (str(tmp_path / "imgs.npz"), str(tmp_path / "folder")):
        m, s = fid.stats_from_source(source, batch_size=3)
        np.testing.assert_array_equal(m, mu_f)
        np.testing.assert_array_equal(s, sigma_f)
    with pytest.raises(ValueError, match="arr_0"):
        np.savez(tmp_path / "bad.npz", images=images)
        fid.stats_from_npz(str(tmp_path / "bad.npz"))


def test_dataset_features_cache(tmp_path, monkeypatch):
    """The cache is read back when the images are the same, and recomputed when they change. The network
    is replaced by a counter here: what is tested is the bookkeeping, not Inception."""
    calls = []
    def fake_features(images, *args, **kwargs):
        calls.append(len(images))
        return images.reshape(len(images), -1)[:, :1].astype(np.float64) * np.ones((1, 2048))
    imgs = np.random.default_rng(0).integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    monkeypatch.setattr(fid, "inception_features", fake_features)
    monkeypatch.setattr(fid, "dataset_images", lambda name: imgs)
    cache = str(tmp_path / "c.npz")
    first = fid.dataset_features("digits", cache=cache)
    again = fid.dataset_features("digits", cache=cache)
    np.testing.assert_array_equal(first, again)
    assert calls == [3]
    imgs = imgs.copy()
    imgs[0, 0, 0, 0] ^= 1
    monkeypatch.setattr(fid, "dataset_images", lambda name: imgs)
    fid.dataset_features("digits", cache=cache)
    assert calls == [3, 3]
