"""experiments.runs.data: shapes and metadata, no side effects, the exact quadratic (linreg),
and the local-file loaders on tiny fabricated files."""

import gzip
import hashlib
import os
import pickle
import random

import numpy as np
import pytest
import torch

from experiments.runs import data as D
from experiments.runs.data import KINDS, load_data

OFFLINE = ["mnist1d", "digits", "pytext", "linreg"]


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_datasets_shapes_and_kinds(name):
    d = load_data(name)
    info = d.info
    assert (info.task, len(info.input_shape)) == KINDS[name]
    assert tuple(d.x_train.shape[1:]) == info.input_shape == tuple(d.x_test.shape[1:])
    assert len(d.x_train) == len(d.y_train) > len(d.y_test) > 0
    if info.task == "classify":
        assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.long
        assert set(d.y_train.unique().tolist()) == set(range(info.n_classes))
    if info.task == "lm":
        assert d.x_train.dtype == torch.long and 0 <= int(d.x_train.min()) and int(d.x_train.max()) < info.vocab_size
    if info.task == "regress":
        assert d.y_train.dtype == torch.float32
    assert torch.isfinite(d.x_train.float()).all()


def test_mnist1d_is_generated_without_files_or_global_rng_change(tmp_path, monkeypatch):
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("OPTDYN_CACHE", str(cache))
    D.load_mnist1d.cache_clear()
    np.random.seed(7)
    random.seed(7)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(7)
    random.seed(7)
    d = load_data("mnist1d")  # generated
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    assert list(work.iterdir()) == []
    assert [p.suffix for p in cache.iterdir()] == [".npz"]  # no stray temporary files
    assert d.x_train.shape == (4000, 1, 40) and d.x_test.shape == (1000, 1, 40)
    # make_dataset standardises the whole set: mean 0, std 1 over train+test together
    x = torch.cat([d.x_train, d.x_test]).double()
    assert abs(float(x.mean())) < 1e-6 and float(x.std()) == pytest.approx(1.0, abs=1e-3)
    D.load_mnist1d.cache_clear()
    again = load_data("mnist1d")  # read back from the disk cache
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)
    # a corrupt cache file is regenerated (generator stubbed: the real one takes seconds)
    import mnist1d.data

    calls = []
    fake = {"x": np.zeros((8, 40)), "y": np.arange(8), "x_test": np.ones((2, 40)), "y_test": np.arange(2)}
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda args: calls.append(args) or fake)
    cached = next(cache.iterdir())
    for garbage in (b"garbage", cached.read_bytes()[:100]):  # not an npz; a truncated zip
        cached.write_bytes(garbage)
        D.load_mnist1d.cache_clear()
        assert load_data("mnist1d").x_test.shape == (2, 1, 40)
    assert len(calls) == 2
    D.load_mnist1d.cache_clear()


def test_digits_standardised_with_train_statistics():
    d = load_data("digits")
    x = d.x_train.flatten(1).double()
    std = x.std(0, unbiased=False)
    used = std > 0
    assert torch.allclose(x.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(std[used], torch.ones(int(used.sum()), dtype=torch.float64), atol=1e-5)
    assert len(d.y_train) + len(d.y_test) == 1797


def test_pytext_is_next_byte_prediction_on_the_documented_corpus():
    d = load_data("pytext", seq_len=32)
    corpus = D.pytext_corpus()
    assert d.info.extras["sha256"] == hashlib.sha256(corpus).hexdigest()
    assert torch.equal(d.x_train[:, 1:], d.y_train[:, :-1])
    first = np.frombuffer(corpus[:33], dtype=np.uint8)
    np.testing.assert_array_equal(d.x_train[0].numpy(), first[:32])
    np.testing.assert_array_equal(d.y_train[0].numpy(), first[1:])
    n = len(corpus)
    assert len(d.x_train) == (int(0.9 * n) - 1) // 32 and len(d.x_test) == (n - int(0.9 * n) - 1) // 32
    # the test windows come from the tail of the corpus
    tail = np.frombuffer(corpus[int(0.9 * n):int(0.9 * n) + 32], dtype=np.uint8)
    np.testing.assert_array_equal(d.x_test[0].numpy(), tail)
    with pytest.raises(ValueError, match="seq_len=1 "):
        load_data("pytext", seq_len=1)


@pytest.mark.parametrize("spectrum", ["geometric", "linear", [3.0, 1.0, 0.5, 0.25]])
def test_linreg_exact_hessian_minimiser_and_noise(spectrum):
    d = load_data("linreg", dim=4, spectrum=spectrum, lam_max=2.0, lam_min=0.1, noise_std=0.3, n_train=200)
    ex = d.info.extras
    s = ex["hessian_eigenvalues"]
    expected = {"geometric": 2.0 * 0.05 ** (np.arange(4) / 3), "linear": np.linspace(2.0, 0.1, 4)}
    np.testing.assert_allclose(s, expected.get(spectrum if isinstance(spectrum, str) else "", [3.0, 1.0, 0.5, 0.25]))
    x, y = d.x_train.double().numpy(), d.y_train.double().numpy()
    n = len(y)
    # float32 storage: relative errors ~1e-7 per entry, sums of 200 terms: 1e-5 is ample
    np.testing.assert_allclose(x.T @ x / n, np.diag(s), atol=1e-5 * s.max())
    w_hat = np.linalg.lstsq(x, y, rcond=None)[0]
    np.testing.assert_allclose(w_hat, ex["w_star"], atol=1e-5 * np.abs(ex["w_star"]).max() / s.min())
    r = y - x @ ex["w_star"]
    assert np.mean(r ** 2) == pytest.approx(0.09, rel=1e-4)
    np.testing.assert_allclose(ex["grad_noise_diag"], np.mean(r[:, None] ** 2 * x ** 2, 0), rtol=1e-4)
    np.testing.assert_allclose(ex["train_hessian_eigenvalues"], s, rtol=1e-6)


def test_linreg_without_exact_is_a_plain_sample():
    """exact=False: E[xxᵀ] = diag(s) only in expectation; the sample second moment of
    s_i z² has standard error s_i √(2/n) = 0.014 s_i at n = 10⁴; 5 standard errors."""
    d = load_data("linreg", dim=5, n_train=10_000, exact=False, seed=1)
    x = d.x_train.double().numpy()
    s = d.info.extras["hessian_eigenvalues"]
    np.testing.assert_allclose(np.mean(x ** 2, 0), s, rtol=5 * np.sqrt(2 / 10_000))
    assert not np.allclose(x.T @ x / len(x), np.diag(s), atol=1e-6)


def test_linreg_and_load_data_validation():
    with pytest.raises(ValueError, match="spectrum='flat' is unknown"):
        load_data("linreg", spectrum="flat")
    with pytest.raises(ValueError, match="n_train=10 must be an integer > dim=20"):
        load_data("linreg", n_train=10)
    with pytest.raises(ValueError, match="spectrum=.*must be 20 positive"):
        load_data("linreg", spectrum=[1.0, -1.0])
    with pytest.raises(ValueError, match="data='svhn' is unknown"):
        load_data("svhn")
    with pytest.raises(ValueError, match="data_args=.*do not fit data='digits'"):
        load_data("digits", seq_len=3)
    with pytest.raises(ValueError, match=r"n_train=5000 is outside the valid range \[1, 1438\]"):
        load_data("digits", n_train=5000)
    assert len(load_data("digits", n_train=100).y_train) == 100


# ---------------------------------------------------------------- local files
def _write_idx(path, array, gz=False):
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("layout, gz", [("", False), ("MNIST/raw", True)])
def test_mnist_from_idx_files(tmp_path, layout, gz):
    rng = np.random.default_rng(0)
    root = tmp_path / layout
    root.mkdir(parents=True, exist_ok=True)
    images = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (5, 28, 28))}
    labels = {"train": np.arange(12) % 10, "t10k": np.arange(5)}
    suffix = ".gz" if gz else ""
    for part in ("train", "t10k"):
        _write_idx(root / f"{part}-images-idx3-ubyte{suffix}", images[part], gz)
        _write_idx(root / f"{part}-labels-idx1-ubyte{suffix}", labels[part], gz)
    d = load_data("mnist", data_dir=str(tmp_path))
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    expected = (images["train"][3] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(d.x_train[3, 0].numpy(), expected, rtol=1e-5)
    np.testing.assert_array_equal(d.y_train.numpy(), labels["train"])


def test_cifar10_from_pickle_batches_via_env(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in D.CIFAR_FILES:
        batch = {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), b"labels": list(range(4))}
        (root / name).write_bytes(pickle.dumps(batch))
    monkeypatch.setenv(D.DATA_ENV, str(tmp_path))
    d = load_data("cifar10")
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    x = d.x_train.double()
    np.testing.assert_allclose(x.mean((0, 2, 3)).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(x.std((0, 2, 3), unbiased=False).numpy(), 1, atol=1e-4)


@pytest.mark.parametrize("name, files", [("mnist", D.MNIST_FILES), ("cifar10", D.CIFAR_FILES)])
def test_missing_local_files_explain_what_to_do(tmp_path, monkeypatch, name, files):
    monkeypatch.delenv(D.DATA_ENV, raising=False)
    with pytest.raises(ValueError) as err:
        load_data(name)
    msg = str(err.value)
    assert "OPTDYN_DATA" in msg and "https://" in msg and all(f in msg for f in files)
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_data(name, data_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or written
    assert os.environ.get(D.DATA_ENV) is None
