r"""Datasets, offline by default: each loader returns a :class:`Data` (train/test tensors)
with a :class:`DataInfo` that the model builders read (input shape, classes or vocabulary,
task kind).

=========  ========  =====================================================================
name       task      what
=========  ========  =====================================================================
mnist1d    classify  MNIST-1D (Greydanus 2020), generated in memory by
                     ``mnist1d.data.make_dataset`` with the package's default arguments
                     (seed 42): 4000 train / 1000 test signals of shape (1, 40). Nothing
                     is downloaded (``mnist1d.get_dataset`` would download and write to
                     the working directory); the generated arrays are cached in
                     :func:`cache_dir` (user cache, atomic writes).
digits     classify  scikit-learn's bundled 8x8 digits, (1, 8, 8), standardised per pixel
                     with train statistics; a fixed 80/20 split (permutation seed 0).
pytext     lm        bytes of :data:`PYTEXT_MODULES` (Python standard-library sources),
                     next-byte prediction on non-overlapping windows of ``seq_len``.
linreg     regress   Gaussian inputs with a known covariance spectrum: the quadratic
                     "network" with a known Hessian (see :func:`load_linreg`).
mnist      classify  MNIST from the standard IDX files in a local directory.
cifar10    classify  CIFAR-10 from the python pickle batches in a local directory.
=========  ========  =====================================================================

Every loader also accepts ``n_train`` (keep only the first ``n_train`` training examples;
handy for full-batch runs). Loaders are memoised in memory (``functools.lru_cache``): the
returned tensors are shared, so do not modify them in place.

The local-file datasets look in ``data_dir`` (argument), else ``$OPTDYN_DATA``; they never
download. Missing files raise a ValueError that says which files to put where.

Data identity (:func:`data_fingerprint`, ``Data.fingerprint``): for the local-file datasets
the sha256 of the files read (so other MNIST files under the same ``--data-dir`` give another
fingerprint); for the generated ones a hash of the loader's name and arguments, which the
run config already holds. File contents are hashed once per (path, size, mtime).
"""

import dataclasses
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

TASKS = ("classify", "lm", "regress")

#: The pytext corpus: these modules' source files, concatenated in this order (UTF-8
#: bytes, each followed by a newline). Only non-frozen pure-Python modules, present in
#: every CPython >= 3.11. The text differs slightly between Python versions, so the
#: corpus' sha256 is recorded in ``DataInfo.extras["sha256"]``.
PYTEXT_MODULES = (
    "argparse", "ast", "calendar", "dataclasses", "difflib", "enum", "fractions",
    "functools", "heapq", "inspect", "pprint", "statistics", "string", "textwrap",
    "tokenize", "typing",
)

#: Where the local-file datasets can be downloaded by hand.
SOURCES = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (or http://yann.lecun.com/exdb/mnist/)",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (unpack it)",
}
DATA_ENV = "OPTDYN_DATA"


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a dataset.

    ``input_shape`` is per example, channels first ((C, L) for signals, (C, H, W) for
    images, (seq_len,) of byte ids for ``lm``, (dim,) for ``regress``). ``n_classes``
    for ``classify``; ``vocab_size`` for ``lm``; ``extras`` holds dataset-specific facts
    (e.g. the true Hessian of ``linreg``).
    """

    name: str
    task: str
    input_shape: tuple
    n_classes: int | None = None
    vocab_size: int | None = None
    extras: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True, eq=False)
class Data:
    info: DataInfo
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    fingerprint: str = ""  # see data_fingerprint

    @property
    def n_train(self):
        return len(self.y_train)


def _data(info, x_train, y_train, x_test, y_test):
    x_dtype = np.int64 if info.task == "lm" else np.float32
    y_dtype = np.float32 if info.task == "regress" else np.int64
    as_x = lambda a: torch.from_numpy(np.array(a, dtype=x_dtype, order="C"))  # noqa: E731 (a writable copy)
    as_y = lambda a: torch.from_numpy(np.array(a, dtype=y_dtype, order="C"))  # noqa: E731
    return Data(info, as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test))


# --------------------------------------------------------------------------- mnist1d
def cache_dir():
    """Where generated datasets are cached: ``$OPTDYN_CACHE``, else
    ``$XDG_CACHE_HOME/optdyn``, else ``~/.cache/optdyn``; ``OPTDYN_CACHE=""`` turns the
    disk cache off (then only the in-memory cache is used)."""
    env = os.environ.get("OPTDYN_CACHE")
    if env is not None:
        return Path(env).expanduser() if env else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optdyn"


@lru_cache(maxsize=2)
def load_mnist1d():
    """MNIST-1D from ``make_dataset(get_dataset_args())`` (1–2 s of CPU), cached in
    memory and as an ``.npz`` in :func:`cache_dir` (written atomically; keyed by the
    mnist1d version and the generator arguments; an unreadable cache file is regenerated).
    The global numpy and ``random`` states that ``make_dataset`` reseeds are restored."""
    import importlib.metadata
    import json
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    key = json.dumps([importlib.metadata.version("mnist1d"), vars(args)], sort_keys=True)
    root = cache_dir()
    path = root / f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz" if root else None
    d = None
    if path is not None and path.is_file():
        try:
            with np.load(path) as f:
                d = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            d = None
    if d is None:
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            d = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        if path is not None:
            from experiments.store import atomic_write_bytes

            buf = io.BytesIO()
            np.savez(buf, **{k: d[k] for k in ("x", "y", "x_test", "y_test")})
            try:
                atomic_write_bytes(path, buf.getvalue())
            except OSError:
                pass  # an unwritable cache only costs time
    info = DataInfo("mnist1d", "classify", (1, d["x"].shape[1]), n_classes=10)
    return _data(info, d["x"][:, None, :], d["y"], d["x_test"][:, None, :], d["y_test"])


# --------------------------------------------------------------------------- digits
@lru_cache(maxsize=2)
def load_digits():
    """sklearn digits: 1797 images 8x8, fixed split (1438 train / 359 test), pixels
    standardised with the train mean and std (constant pixels: std taken as 1)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x, y = bunch.data.astype(np.float64), bunch.target
    perm = np.random.default_rng(0).permutation(len(y))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0
    x = ((x - mean) / std).reshape(-1, 1, 8, 8)
    info = DataInfo("digits", "classify", (1, 8, 8), n_classes=10)
    return _data(info, x[train], y[train], x[test], y[test])


# --------------------------------------------------------------------------- pytext
def pytext_corpus(modules=PYTEXT_MODULES) -> bytes:
    """The concatenated source bytes of ``modules`` (found with importlib, not imported)."""
    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise ValueError(f"pytext module {name!r} has no Python source file on this interpreter")
        parts.append(Path(spec.origin).read_bytes() + b"\n")
    return b"".join(parts)


@lru_cache(maxsize=4)
def load_pytext(seq_len=64, test_fraction=0.1):
    r"""Next-byte prediction on the standard-library corpus.

    The corpus (bytes 0..255) is split at ``1 - test_fraction`` of its length (train
    first, test the tail), and each part cut into non-overlapping windows of
    ``seq_len + 1`` bytes: input = first ``seq_len`` bytes, target = the next byte at each
    position (so ``x[:, 1:] == y[:, :-1]``).
    """
    if not (isinstance(seq_len, int) and 2 <= seq_len <= 4096):
        raise ValueError(f"seq_len={seq_len!r} is outside the valid range [2, 4096]")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r} is outside the valid range (0, 1)")
    corpus = pytext_corpus()
    tokens = np.frombuffer(corpus, dtype=np.uint8).astype(np.int64)
    cut = int(len(tokens) * (1 - test_fraction))

    def windows(a):
        n = (len(a) - 1) // seq_len
        idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
        w = a[idx]
        return w[:, :-1], w[:, 1:]

    extras = {"sha256": hashlib.sha256(corpus).hexdigest(), "n_bytes": len(corpus),
              "modules": ",".join(PYTEXT_MODULES)}
    info = DataInfo("pytext", "lm", (seq_len,), vocab_size=256, extras=extras)
    return _data(info, *windows(tokens[:cut]), *windows(tokens[cut:]))


# --------------------------------------------------------------------------- linreg
def linreg_spectrum(dim=20, spectrum="geometric", lam_max=1.0, lam_min=0.01):
    r"""The covariance eigenvalues s_1 >= ... >= s_dim of the ``linreg`` inputs.

    - "geometric": :math:`s_i = \lambda_{max} (\lambda_{min}/\lambda_{max})^{(i-1)/(d-1)}`
    - "linear": evenly spaced from :math:`\lambda_{max}` down to :math:`\lambda_{min}`
    - a sequence of ``dim`` positive numbers: used as given (sorted descending).
    """
    if not (isinstance(dim, int) and 1 <= dim <= 10_000):
        raise ValueError(f"dim={dim!r} is outside the valid range [1, 10000]")
    if not (0 < lam_min <= lam_max < np.inf):
        raise ValueError(f"lam_min={lam_min!r}, lam_max={lam_max!r}: need 0 < lam_min <= lam_max < inf")
    if isinstance(spectrum, str):
        if spectrum == "geometric":
            return lam_max * (lam_min / lam_max) ** (np.arange(dim) / max(dim - 1, 1))
        if spectrum == "linear":
            return np.linspace(lam_max, lam_min, dim)
        raise ValueError(f"spectrum={spectrum!r} is unknown; valid: geometric, linear, "
                         f"or a list of {dim} positive numbers")
    s = np.sort(np.asarray(spectrum, dtype=float))[::-1]
    if s.shape != (dim,) or not np.all((s > 0) & np.isfinite(s)):
        raise ValueError(f"spectrum={list(spectrum)!r} must be {dim} positive finite numbers (dim={dim})")
    return s


@lru_cache(maxsize=8)
def load_linreg(dim=20, spectrum="geometric", lam_max=1.0, lam_min=0.01, noise_std=0.1,
                n_train=4096, n_test=1024, seed=0, exact=True):
    r"""Linear regression with a known Hessian: with the ``linear`` model (no bias) and
    the loss :math:`L(w) = \frac{1}{2n}\sum_i (x_i \cdot w - y_i)^2`, the Hessian is
    :math:`\frac1n X^\top X`.

    Inputs :math:`x = \mathrm{diag}(\sqrt s)\, z`, :math:`z \sim N(0, I)`, so
    :math:`E[x x^\top] = \mathrm{diag}(s)` with ``s = linreg_spectrum(dim, spectrum,
    lam_max, lam_min)``; targets :math:`y = x \cdot w^* + \sigma\varepsilon`,
    :math:`w^* \sim N(0, I)`, :math:`\varepsilon \sim N(0,1)`, :math:`\sigma` = ``noise_std``.

    With ``exact=True`` (default) the training sample is adjusted so the facts hold
    exactly, not only in expectation: the inputs are symmetrically whitened
    (:math:`X \leftarrow X (X^\top X/n)^{-1/2}\mathrm{diag}(\sqrt s)`, so the training-loss
    Hessian is exactly diag(s)) and the noise vector is projected orthogonal to the
    columns of X and rescaled to norm :math:`\sigma\sqrt n` (so :math:`w^*` is exactly the
    minimiser and the residual variance at it is exactly :math:`\sigma^2`). The test set
    is drawn plainly. Needs ``n_train > dim``.

    ``extras``: ``hessian_eigenvalues`` (s; the Hessian is diagonal in the input
    coordinates, eigenvector i = coordinate i), ``noise_std``, ``w_star``,
    ``grad_noise_diag`` (the exact per-example gradient covariance diagonal at
    :math:`w^*`, :math:`\frac1n\sum_i r_i^2 x_{ij}^2` with :math:`r_i = y_i - x_i\cdot w^*`;
    about :math:`\sigma^2 s_j`; a batch of B examples drawn without replacement has
    :math:`\frac{n-B}{(n-1)B}` times it), ``train_hessian_eigenvalues`` (of
    :math:`X^\top X/n`, equal to s when ``exact``).
    """
    s = linreg_spectrum(dim, spectrum, lam_max, lam_min)
    if not (isinstance(n_train, int) and n_train > dim):
        raise ValueError(f"n_train={n_train!r} must be an integer > dim={dim}")
    if not (isinstance(n_test, int) and n_test >= 1):
        raise ValueError(f"n_test={n_test!r} is outside the valid range [1, inf)")
    if not (0 <= noise_std < np.inf):
        raise ValueError(f"noise_std={noise_std!r} is outside the valid range [0, inf)")
    rng = np.random.default_rng(seed)
    w_star = rng.standard_normal(dim)
    x = rng.standard_normal((n_train, dim))
    eps = rng.standard_normal(n_train)
    x_test = rng.standard_normal((n_test, dim)) * np.sqrt(s)
    y_test = x_test @ w_star + noise_std * rng.standard_normal(n_test)
    if exact:
        evals, evecs = np.linalg.eigh(x.T @ x / n_train)
        x = x @ (evecs / np.sqrt(evals)) @ evecs.T
        q, _ = np.linalg.qr(x)
        eps -= q @ (q.T @ eps)
        eps *= np.sqrt(n_train) / np.linalg.norm(eps)
    x = x * np.sqrt(s)
    noise = noise_std * eps
    y = x @ w_star + noise
    extras = {
        "hessian_eigenvalues": s, "noise_std": float(noise_std), "w_star": w_star,
        "grad_noise_diag": (noise[:, None] ** 2 * x ** 2).mean(0),
        "train_hessian_eigenvalues": np.sort(np.linalg.eigvalsh(x.T @ x / n_train))[::-1],
    }
    info = DataInfo("linreg", "regress", (dim,), extras=extras)
    return _data(info, x, y, x_test, y_test)


# --------------------------------------------------------------------------- local files
def _data_root(data_dir):
    root = data_dir or os.environ.get(DATA_ENV)
    return Path(root).expanduser() if root else None


def _find(root, candidates, names, dataset):
    """The first directory among ``root/c`` holding all ``names`` (``.gz`` allowed)."""
    if root is not None:
        for sub in candidates:
            d = root / sub
            found = [next((d / (n + ext) for ext in ("", ".gz") if (d / (n + ext)).is_file()), None)
                     for n in names]
            if all(found):
                return found
    where = (f"in {root} (or one of its subdirectories {', '.join(c for c in candidates if c)})"
             if root is not None else f"in a directory given by --data-dir / data_dir or ${DATA_ENV}")
    raise ValueError(f"data={dataset!r} needs the files {', '.join(names)} {where}; "
                     f"download them from {SOURCES[dataset]}; nothing is downloaded automatically")


def _read_idx(path):
    """An IDX file (LeCun's MNIST format): magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dims."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4").astype(int)
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_mnist(data_dir=None):
    """MNIST from the four IDX files in ``data_dir``, ``data_dir/mnist`` or
    ``data_dir/MNIST/raw`` (torchvision's layout); scaled to [0, 1] then standardised
    with the usual mean 0.1307 and std 0.3081. Shape (1, 28, 28)."""
    return _mnist(_stamped(_mnist_files(data_dir)))


def _mnist_files(data_dir):
    return _find(_data_root(data_dir), ("", "mnist", "MNIST", "MNIST/raw"), MNIST_FILES, "mnist")


def _stamped(paths):
    """``(path, size, mtime_ns)`` per file: the memo key, so a file changed in place is reread."""
    return tuple((p, p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


@lru_cache(maxsize=2)
def _mnist(stamped):
    paths = [p for p, _, _ in stamped]
    xtr, ytr, xte, yte = (_read_idx(p) for p in paths)
    norm = lambda a: ((a.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    info = DataInfo("mnist", "classify", (1,) + xtr.shape[1:], n_classes=10)
    return _data(info, norm(xtr), ytr, norm(xte), yte)


CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def load_cifar10(data_dir=None):
    """CIFAR-10 from the python pickle batches in ``data_dir`` or
    ``data_dir/cifar-10-batches-py``; standardised per channel with train statistics.
    Shape (3, 32, 32)."""
    return _cifar10(_stamped(_cifar10_files(data_dir)))


def _cifar10_files(data_dir):
    return _find(_data_root(data_dir), ("", "cifar-10-batches-py", "cifar10"), CIFAR_FILES, "cifar10")


@lru_cache(maxsize=2)
def _cifar10(stamped):
    paths = [p for p, _, _ in stamped]
    def read(p):
        with (gzip.open if p.suffix == ".gz" else open)(p, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        return np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[b"labels"])

    batches = [read(p) for p in paths]
    xtr = np.concatenate([b[0] for b in batches[:-1]]).astype(np.float32) / 255.0
    ytr = np.concatenate([b[1] for b in batches[:-1]])
    xte, yte = batches[-1][0].astype(np.float32) / 255.0, batches[-1][1]
    mean, std = xtr.mean((0, 2, 3), keepdims=True), xtr.std((0, 2, 3), keepdims=True)
    info = DataInfo("cifar10", "classify", (3, 32, 32), n_classes=10)
    return _data(info, (xtr - mean) / std, ytr, (xte - mean) / std, yte)


# --------------------------------------------------------------------------- registry
DATASETS = {
    "mnist1d": load_mnist1d,
    "digits": load_digits,
    "pytext": load_pytext,
    "linreg": load_linreg,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
}
LOCAL_FILE_DATASETS = ("mnist", "cifar10")
#: (task, number of input dims per example) of each dataset, known without loading it
KINDS = {"mnist1d": ("classify", 2), "digits": ("classify", 3), "pytext": ("lm", 1),
         "linreg": ("regress", 1), "mnist": ("classify", 3), "cifar10": ("classify", 3)}


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


LOCAL_FILES = {"mnist": _mnist_files, "cifar10": _cifar10_files}


@lru_cache(maxsize=64)
def _file_sha256(stamp):
    digest = hashlib.sha256()
    with open(stamp[0], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(name, *, data_dir=None, **data_args) -> str:
    """16 hex digits identifying the data a run with ``data=name, data_args`` reads:
    the files' contents for a local-file dataset (found as the loader finds them; missing
    files raise its ValueError), else the loader's arguments (module docstring)."""
    import json

    parts = [name, sorted((k, repr(v)) for k, v in data_args.items())]
    if name in LOCAL_FILES:
        parts.append([_file_sha256(s) for s in _stamped(LOCAL_FILES[name](data_dir))])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def load_data(name, *, data_dir=None, n_train=None, **options) -> Data:
    """Load dataset ``name`` with its ``options`` (see each loader); ``n_train`` keeps the
    first ``n_train`` training examples (for ``linreg`` it is the sample size itself).
    ``Data.fingerprint`` is :func:`data_fingerprint` of the same arguments."""
    if name not in DATASETS:
        raise ValueError(f"data={name!r} is unknown; valid: {', '.join(DATASETS)}")
    fingerprint = data_fingerprint(name, data_dir=data_dir, **({} if n_train is None else {"n_train": n_train}),
                                   **options)
    loader = DATASETS[name]
    if name in LOCAL_FILE_DATASETS:
        options["data_dir"] = data_dir
    if name == "linreg" and n_train is not None:
        options["n_train"] = n_train
    try:
        data = loader(**{k: _hashable(v) for k, v in options.items()})
    except TypeError as err:
        if "argument" not in str(err):
            raise
        raise ValueError(f"data_args={options!r} do not fit data={name!r}: {err}") from None
    if n_train is not None and name != "linreg":
        if not (isinstance(n_train, int) and 1 <= n_train <= data.n_train):
            raise ValueError(f"n_train={n_train!r} is outside the valid range [1, {data.n_train}] for data={name!r}")
        data = Data(data.info, data.x_train[:n_train], data.y_train[:n_train], data.x_test, data.y_test)
    return dataclasses.replace(data, fingerprint=fingerprint)
