"""diffjax.data: the offline digits builder, exact-resume training batches, eval batches, toys."""

import contextlib
import itertools
import os
import socket
import time

import numpy as np
import pytest

from diffjax import data
from diffjax.data import images, pipeline, toy
from diffjax.data.digits.digits_dataset_builder import split_indices, to_uint8

N_TRAIN, N_TEST = 1500, 297


@contextlib.contextmanager
def no_network():
    """Any attempt to resolve a host name or open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", refuse)
        mp.setattr(socket.socket, "connect", refuse)
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data dir with ``digits`` built (offline) once for the whole module."""
    path = str(tmp_path_factory.mktemp("tfds"))
    with no_network():
        data.prepare("digits", path)
    return path


def take(iterator, n):
    """The next n batches of ``iterator`` as a list."""
    return list(itertools.islice(iterator, n))


def digits_batches(data_dir, n, **kwargs):
    kwargs = {"global_batch_size": 128, "seed": 0, **kwargs}
    return take(data.train_batches("digits", data_dir=data_dir, **kwargs), n)


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def to_uint(x):
    """Inverse of the bin-centre map x = -1 + 2 u / 255 (``dequantize=False``)."""
    u = np.rint((x + 1.0) * 255.0 / 2.0)
    np.testing.assert_allclose(x, -1.0 + 2.0 * u / 255.0, atol=1e-6)
    return u.astype(np.uint8)


def rows(x, labels):
    """Each example as one sortable bytes row (pixels + label), for multiset comparisons."""
    flat = np.concatenate([x.reshape(len(x), -1), labels[:, None].astype(np.uint8)], axis=1)
    return sorted(r.tobytes() for r in flat)


# ---- the digits builder ---------------------------------------------------------------------


def test_digits_builder_offline_splits_and_contents(data_dir):
    import tensorflow_datasets as tfds
    from sklearn.datasets import load_digits

    path = data.prepare("digits", data_dir)
    assert path == os.path.join(data_dir, "digits", "1.0.0")
    builder = tfds.builder_from_directory(path)  # read back without the builder code
    assert builder.info.splits["train"].num_examples == N_TRAIN
    assert builder.info.splits["test"].num_examples == N_TEST
    assert builder.info.features["label"].num_classes == 10

    digits = load_digits()
    expected = to_uint8(digits.images)
    for split, indices in zip(("train", "test"), split_indices()):
        source = builder.as_data_source(split)
        assert len(source) == len(indices)
        imgs = np.stack([source[i]["image"] for i in range(len(source))])
        labels = np.array([source[i]["label"] for i in range(len(source))])
        assert imgs.shape == (len(indices), 8, 8, 1) and imgs.dtype == np.uint8
        assert labels.min() >= 0 and labels.max() <= 9
        np.testing.assert_array_equal(imgs, expected[indices])
        np.testing.assert_array_equal(labels, digits.target[indices])
    assert expected.max() == 255 and expected[digits.images[..., None] == 8].min() == 128


def test_digits_split_is_a_fixed_partition():
    train, test = split_indices()
    assert len(train) == N_TRAIN and len(test) == N_TEST
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(N_TRAIN + N_TEST))
    np.testing.assert_array_equal(train, np.random.default_rng(0).permutation(1797)[:N_TRAIN])


def test_prepare_is_idempotent(data_dir):
    path = data.prepare("digits", data_dir)
    mtime = os.path.getmtime(os.path.join(path, "dataset_info.json"))
    start = time.perf_counter()
    assert data.prepare("digits", data_dir) == path
    assert time.perf_counter() - start < 1.0
    assert os.path.getmtime(os.path.join(path, "dataset_info.json")) == mtime


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFJAX_DATA_DIR", str(tmp_path / "env"))
    assert data.default_data_dir() == str(tmp_path / "env")
    assert data.default_data_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")
    monkeypatch.delenv("DIFFJAX_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.default_data_dir() == str(tmp_path / "cache" / "diffjax" / "tensorflow_datasets")


# ---- training batches -----------------------------------------------------------------------


@pytest.mark.parametrize("dequantize", [True, False])
def test_train_batch_shape_dtype_range(data_dir, dequantize):
    (batch,) = digits_batches(data_dir, 1, dequantize=dequantize, random_flip=True)
    assert batch["x"].shape == (128, 8, 8, 1) and batch["x"].dtype == np.float32
    assert batch["label"].shape == (128,) and batch["label"].dtype == np.int32
    assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0
    assert batch["label"].min() >= 0 and batch["label"].max() <= 9


def test_dequantization_convention(data_dir):
    """x = -1 + 2 (u + U) / 256 with U in [0, 1), u the pixels dequantize=False puts on bin centres."""
    plain = digits_batches(data_dir, 3, dequantize=False)
    noisy = digits_batches(data_dir, 3, dequantize=True)
    for p, q in zip(plain, noisy):
        u = to_uint(p["x"]).astype(np.float64)
        frac = (q["x"].astype(np.float64) + 1.0) * 128.0 - u
        assert frac.min() >= -1e-4 and frac.max() <= 1.0 + 1e-4
        assert 0.4 < frac.mean() < 0.6
        np.testing.assert_array_equal(p["label"], q["label"])


def test_train_batches_deterministic_from_seed(data_dir):
    a = digits_batches(data_dir, 3, random_flip=True)
    assert_batches_equal(a, digits_batches(data_dir, 3, random_flip=True))
    b = digits_batches(data_dir, 3, seed=1, random_flip=True)
    assert not np.array_equal(a[0]["x"], b[0]["x"])


def test_resume_equals_uninterrupted(data_dir):
    """start_step=k yields bitwise the batches an uninterrupted run yields from step k on
    (128 does not divide 1500, so these batches straddle an epoch boundary)."""
    full = digits_batches(data_dir, 16, random_flip=True)
    assert_batches_equal(digits_batches(data_dir, 6, random_flip=True, start_step=10), full[10:])


def test_each_epoch_covers_train_split_once_in_fresh_order(data_dir):
    batches = digits_batches(data_dir, 24, dequantize=False)  # 24 * 128 = 3072 >= 2 epochs
    u = to_uint(np.concatenate([b["x"] for b in batches]))
    labels = np.concatenate([b["label"] for b in batches])
    train = list(data.eval_batches("digits", split="train", batch_size=500, data_dir=data_dir))
    expected = rows(np.concatenate([b["x"] for b in train]), np.concatenate([b["label"] for b in train]))
    epochs = [slice(0, N_TRAIN), slice(N_TRAIN, 2 * N_TRAIN)]
    for e in epochs:
        assert rows(u[e], labels[e]) == expected
    assert not np.array_equal(u[epochs[0]], u[epochs[1]])


def test_split_read_per_batch_equals_in_memory(data_dir, monkeypatch):
    """A split too large for memory is read from the data source per batch: same stream, bitwise."""
    kwargs = {"random_flip": True, "start_step": 9}
    in_memory = digits_batches(data_dir, 4, **kwargs)
    monkeypatch.setattr(pipeline, "IN_MEMORY_BYTES", 0)
    reads = []
    real_read = pipeline._Examples._read
    monkeypatch.setattr(pipeline._Examples, "_read", lambda self, index: reads.append(len(index)) or real_read(self, index))
    assert_batches_equal(digits_batches(data_dir, 4, **kwargs), in_memory)
    assert reads and max(reads) == 128  # never the whole split


def test_augment_names_bad_shapes():
    images_ = np.zeros((4, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match="u must have shape"):
        pipeline.augment(images_, np.zeros((4, 64), np.float32), num_bits=8, dequantize=True, random_flip=False)
    with pytest.raises(ValueError, match="random_flip"):
        pipeline.augment(np.zeros((4, 64), np.uint8), np.zeros((4, 65), np.float32), num_bits=8,
                         dequantize=True, random_flip=True)


def test_stream_uniforms_are_per_element_and_sliceable():
    """Element i's uniforms do not depend on which slice draws them; they lie in [0, 1) and look uniform."""
    whole = pipeline.stream_uniforms(7, 0, 300, 65)
    assert whole.shape == (300, 65) and whole.dtype == np.float32
    np.testing.assert_array_equal(pipeline.stream_uniforms(7, 123, 50, 65), whole[123:173])
    assert whole.min() >= 0.0 and whole.max() < 1.0
    assert abs(whole.mean() - 0.5) < 0.01 and abs(whole.var() - 1 / 12) < 0.003
    assert not np.array_equal(pipeline.stream_uniforms(8, 0, 300, 65), whole)
    assert len(np.unique(whole)) > 0.99 * whole.size  # no repeated words across elements or columns


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_single_process_batch(data_dir, process_count):
    kwargs = {"random_flip": True, "start_step": 11}
    single = digits_batches(data_dir, 3, **kwargs)
    parts = [digits_batches(data_dir, 3, process_index=p, process_count=process_count, **kwargs)
             for p in range(process_count)]
    for s, batch in enumerate(single):
        for k in ("x", "label"):
            assert parts[0][s][k].shape[0] == 128 // process_count
            np.testing.assert_array_equal(np.concatenate([part[s][k] for part in parts]), batch[k])


def test_random_flip_mirrors_some_examples(data_dir):
    (plain,) = digits_batches(data_dir, 1, dequantize=False)
    (flip,) = digits_batches(data_dir, 1, dequantize=False, random_flip=True)
    same = np.all(flip["x"] == plain["x"], axis=(1, 2, 3))
    mirrored = np.all(flip["x"] == plain["x"][:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 20 < np.sum(mirrored & ~same) < 108


@pytest.mark.parametrize("bad", [0, -4, 10, 2.5])
def test_bad_global_batch_size_is_named(bad):
    for name in ("digits", "ring"):
        with pytest.raises(ValueError, match="global_batch_size"):
            data.train_batches(name, global_batch_size=bad, seed=0, process_count=4)


def test_random_flip_on_toy_data_is_rejected():
    with pytest.raises(ValueError, match="random_flip"):
        data.train_batches("ring", global_batch_size=8, seed=0, random_flip=True)


# ---- evaluation batches ---------------------------------------------------------------------


def test_eval_batches_digits_are_integer_images(data_dir):
    batches = list(data.eval_batches("digits", batch_size=128, data_dir=data_dir))
    assert [len(b["x"]) for b in batches] == [128, 128, 41]
    x = np.concatenate([b["x"] for b in batches])
    assert x.shape == (N_TEST, 8, 8, 1) and x.dtype == np.uint8
    assert np.concatenate([b["label"] for b in batches]).dtype == np.int32
    head = list(data.eval_batches("digits", batch_size=64, num_examples=100, data_dir=data_dir))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in head]), x[:100])


# ---- registry and fast failures -------------------------------------------------------------


def test_specs():
    assert data.get_spec("digits") == data.DatasetSpec((8, 8, 1), 10, 8, "image")
    assert data.get_spec("cifar10").shape == (32, 32, 3)
    assert data.get_spec("celeb_a") == data.DatasetSpec((64, 64, 3), None, 8, "image")
    assert data.get_spec("ring") == data.DatasetSpec((2,), 8, None, "toy")
    assert set(data.SPECS) == {"digits", "mnist", "cifar10", "celeb_a", "imagenet256", "ring", "gmm", "two_moons",
                               "checkerboard"}


def test_unknown_data_set_is_named():
    for call in (lambda: data.get_spec("imagenet7"),
                 lambda: data.train_batches("imagenet7", global_batch_size=8, seed=0),
                 lambda: data.eval_batches("imagenet7", batch_size=8)):
        with pytest.raises(ValueError, match=r"imagenet7.*digits"):
            call()
    with pytest.raises(ValueError, match="'ring' is not a TFDS image data set"):
        data.prepare("ring")


def test_unprepared_mnist_fails_fast_with_instructions(tmp_path):
    start = time.perf_counter()
    for call in (lambda: data.train_batches("mnist", global_batch_size=8, seed=0, data_dir=str(tmp_path)),
                 lambda: data.eval_batches("mnist", batch_size=8, data_dir=str(tmp_path))):
        with no_network(), pytest.raises(data.DatasetNotPreparedError) as info:
            call()
        message = str(info.value)
        for part in ("'mnist'", str(tmp_path), "tfds build mnist", "array_record", "digits"):
            assert part in message
    assert time.perf_counter() - start < 20.0


def test_mnist_prepared_as_tfrecord_says_array_record(tmp_path):
    version_dir = tmp_path / "mnist" / "3.0.1"
    version_dir.mkdir(parents=True)
    (version_dir / "dataset_info.json").write_text("{}")
    (version_dir / "mnist-train.tfrecord-00000-of-00001").write_text("")
    with pytest.raises(data.DatasetNotPreparedError, match="without array_record files"):
        data.prepare("mnist", str(tmp_path))


def test_celeb_a_center_crop_resize():
    image = np.random.default_rng(0).integers(0, 256, (218, 178, 3), dtype=np.uint8)
    out = images.center_crop_resize(image)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    flat = np.full((218, 178, 3), 77, np.uint8)
    np.testing.assert_array_equal(images.center_crop_resize(flat), 77)


# ---- toy data -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(toy.TOY_SPECS))
def test_toy_batches(name):
    spec = data.get_spec(name)
    batches = take(data.train_batches(name, global_batch_size=64, seed=3), 3)
    for b in batches:
        assert b["x"].shape == (64, *spec.shape) and b["x"].dtype == np.float32
        assert b["label"].shape == (64,) and b["label"].dtype == np.int32
        assert np.all(np.isfinite(b["x"]))
        assert b["label"].min() >= 0 and b["label"].max() < (spec.num_classes or 1)
    assert not np.array_equal(batches[0]["x"], batches[1]["x"])
    resumed = take(data.train_batches(name, global_batch_size=64, seed=3, start_step=1), 2)
    assert_batches_equal(resumed, batches[1:])
    halves = [next(data.train_batches(name, global_batch_size=64, seed=3, process_index=p, process_count=2))
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["x"] for h in halves]), batches[0]["x"])

    evals = list(data.eval_batches(name, batch_size=4096))
    assert sum(len(b["x"]) for b in evals) == toy.TOY_EVAL_SIZE
    assert evals[0]["x"].shape == (4096, *spec.shape) and evals[0]["x"].dtype == np.float32
    head = list(data.eval_batches(name, batch_size=100, num_examples=150))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in head]), evals[0]["x"][:150])


def test_ring_samples_lie_near_their_mode():
    mixture = toy.ring()
    (batch,) = take(data.train_batches("ring", global_batch_size=256, seed=0), 1)
    distance = np.linalg.norm(batch["x"] - np.asarray(mixture.means)[batch["label"]], axis=-1)
    assert distance.max() < 1.0


def test_checkerboard_occupies_dark_squares():
    x = np.concatenate([b["x"] for b in data.eval_batches("checkerboard", batch_size=10_000)])
    assert np.abs(x).max() <= 4.0
    cells = np.floor(x / 2.0).astype(int)
    assert np.all((cells[:, 0] + cells[:, 1]) % 2 == 0)
