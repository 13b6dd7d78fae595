"""Looking at synthetic samples through the teacher's eyes (METHOD 4 and 11).

The paper's Figure 3 in numbers: penultimate features of real and synthetic images, their 2-D
projection, how close each sample sits to the teacher's decision boundary (``margin``), how much of
the real feature space the synthetic features reach (``knn_coverage``; with precision, recall and
density ``prdc``, and the within-class ``class_spread``: ``diversity`` gives them all), and a mixing path
from class A to class B (``path_strip``). Pure functions over tensors and arrays; no Streamlit.
"""
from __future__ import annotations

import copy
import hashlib
import threading
import warnings
from collections import OrderedDict

import numpy as np
import torch

from .data import ImageData
from .evaluate import collect_features
from .generator import Generator, generate_images, sample_coefficients, seeded_noise
from .losses import layout

__all__ = ["synthetic_features", "real_features", "real_and_others", "as_one_class", "LRUCache", "prepare_umap",
           "umap_ready", "project", "clear_projection_cache", "margin", "BOUNDARY_THRESHOLD", "boundary_share",
           "knn_coverage", "kth_radii", "prdc", "class_spread", "dominant_labels", "diversity", "generator_diversity",
           "generate_from_input", "latent_interpolation", "crossing_point", "decision_boundary", "path_strip",
           "normalise_coefficients", "mix_samples", "to_display", "image_spread"]

GEN_CHUNK = 500  # images generated per call: bounds memory for large image sizes

# --------------------------------------------------------------------------- features


def synthetic_features(generator: Generator, teacher, n: int, superposed: bool, seed: int = 0, k: int = 2,
                       sampler: str = "softmax", *, fixed: list[float] | None = None,
                       keep_images: bool = False) -> dict:
    """Generate ``n`` images and take the teacher's penultimate features and probabilities.

    Plain: one label per sample (K = 1, coefficient 1). Superposed: K labels uniform with replacement
    and coefficients from ``sample_coefficients(sampler)`` (METHOD 4). Everything (labels,
    coefficients, noise) follows from ``seed`` alone; the global random state is left untouched.
    Returns features (N, D) float32, probs (N, C), labels (N, K) int64, coeffs (N, K) float32,
    seeds (N,) int64 (``generate_images(generator, labels[i:i+1], coeffs[i:i+1], seeds[i:i+1])``
    remakes sample i), and images (N, C, H, W) when ``keep_images``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if superposed and generator.input_mode == "gdfq":
        raise ValueError("a GDFQ generator cannot superpose classes; use superposed=False")
    if superposed and k < 2:
        raise ValueError(f"superposition mixes k >= 2 classes, got k={k}")
    k = k if superposed else 1
    rng = torch.Generator().manual_seed(int(seed))
    labels = torch.randint(generator.num_classes, (n, k), generator=rng)
    seeds = torch.randint(2**31 - 1, (n,), generator=rng).tolist()  # one noise seed per sample
    if k == 1:
        coeffs = torch.ones(n, 1)
    else:
        coeffs = sample_coefficients(n, k, sampler, fixed=fixed, generator=rng)
    feats, probs, images = [], [], []
    for i in range(0, n, GEN_CHUNK):
        x = generate_images(generator, labels[i:i + GEN_CHUNK], coeffs[i:i + GEN_CHUNK], seeds[i:i + GEN_CHUNK])
        f, p = collect_features(teacher.model, x)
        feats.append(f)
        probs.append(p)
        if keep_images:
            images.append(x.cpu())
    out = {"features": torch.cat(feats).numpy().astype(np.float32, copy=False),
           "probs": torch.cat(probs).numpy().astype(np.float32, copy=False),
           "labels": labels.numpy(), "coeffs": coeffs.numpy().astype(np.float32, copy=False),
           "seeds": np.asarray(seeds, dtype=np.int64)}
    if keep_images:
        out["images"] = torch.cat(images)
    return out


def real_features(teacher, data: ImageData, n: int, seed: int = 0) -> dict:
    """Features (N, D), probs (N, C) and labels (N,) of ``n`` real images (a fixed draw per seed)."""
    x, y = data.subset(n, seed)
    f, p = collect_features(teacher.model, x)
    return {"features": f.numpy().astype(np.float32, copy=False),
            "probs": p.numpy().astype(np.float32, copy=False), "labels": y.numpy().astype(np.int64)}


def real_and_others(teacher, data: ImageData, n: int, seed: int = 0) -> tuple[dict, dict]:
    """One draw of up to 2n real images, split: the first n (the draw ``real_features(n)`` makes), and the
    others, which measured against the first n as a generator would be give the real-vs-real reference."""
    both = real_features(teacher, data, min(2 * n, len(data)), seed)
    m = min(n, len(data))
    return ({key: value[:m] for key, value in both.items()}, {key: value[m:] for key, value in both.items()})


def as_one_class(source: dict) -> dict:
    """Real features in ``synthetic_features``'s form: labels (N, 1) with coefficient 1 each."""
    labels = np.asarray(source["labels"])
    return {**source, "labels": labels[:, None], "coeffs": np.ones((len(labels), 1), np.float32)}

# --------------------------------------------------------------------------- 2-D projection

class LRUCache:
    """The ``size`` most recently used values by key, safe to share between threads (pages of several
    sessions may project at once)."""

    def __init__(self, size: int):
        self.size = size
        self._store: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        """The value kept under ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._store.get(key)
            if value is not None:
                self._store.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._store[key] = value
            self._store.move_to_end(key)
            while len(self._store) > self.size:
                self._store.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._store.clear()


_results = LRUCache(32)  # key -> {name: (N, 2)}
_fitted = LRUCache(4)  # key of (real, method, params) -> fitted projector


def _as_features(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(repr(p.shape).encode())
            h.update(p.tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"|")
    return h.hexdigest()


class _PCA:
    """Two principal axes of the real features; signs fixed so a projection never flips between calls."""

    def fit(self, x: np.ndarray) -> "_PCA":
        self.mean = x.mean(axis=0, dtype=np.float64)
        c = x - self.mean
        # Eigenvectors of the (D, D) scatter matrix: LAPACK's SVD of the (N, D) matrix sometimes
        # takes a second on these features where this takes milliseconds.
        _, vecs = np.linalg.eigh(c.T @ c)          # ascending eigenvalues
        axes = np.zeros((2, x.shape[1]))
        top = vecs[:, ::-1][:, :2].T               # (<=2, D)
        axes[:len(top)] = top
        signs = np.sign(axes[np.arange(2), np.abs(axes).argmax(axis=1)])
        self.axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
        self.embedding = self.transform(x)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) @ self.axes.T).astype(np.float32)


SMALL_UMAP = 4000  # up to this many real samples UMAP gets exact distances from us (see _UMAP)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(a), len(b)), computed in float64 so near-equal points stay exact."""
    from sklearn.metrics.pairwise import euclidean_distances
    return euclidean_distances(a.astype(np.float64), b.astype(np.float64)).astype(np.float32)


class _UMAP:
    """umap-learn fitted on the real features; other sets are mapped with ``transform``.

    For small sets (the app's few thousand points) the distances are computed here and handed to
    UMAP as a sparse precomputed matrix: umap-learn's own small-data path calls a compiled distance
    once per pair from Python (seconds for 3,000 points) and compiles a parallel k-NN routine on
    first use; both are avoided. Larger sets use umap-learn's approximate neighbours as usual.
    """

    def __init__(self, seed: int, n_neighbors: int, min_dist: float, n_epochs: int | None):
        import umap  # slow to import (numba): only when a UMAP is asked for
        self.precomputed = None
        self.kw = dict(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, n_epochs=n_epochs,
                       random_state=seed)
        self.umap = umap

    def fit(self, x: np.ndarray) -> "_UMAP":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "n_jobs overridden by random_state"
            if len(x) <= SMALL_UMAP:
                import scipy.sparse
                d = _distances(x, x)
                d[d == 0] = 1e-12      # keep duplicates as neighbours: the sparse matrix drops zeros
                np.fill_diagonal(d, 0)  # UMAP requires a zero diagonal
                self.precomputed = x
                self.model = self.umap.UMAP(metric="precomputed", **self.kw).fit(scipy.sparse.csr_matrix(d))
            else:
                self.model = self.umap.UMAP(**self.kw).fit(x)
        self.embedding = np.asarray(self.model.embedding_, dtype=np.float32)
        _umap_compiled.set()
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "transforming with precomputed metric"
            data = x if self.precomputed is None else _distances(x, self.precomputed)
            return np.asarray(self.model.transform(data), dtype=np.float32)


def prepare_umap() -> None:
    """Import umap and compile its code on a tiny set, so that the first real projection is fast.

    An app can call this once in a background thread at start-up.
    """
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    _UMAP(0, 5, 0.1, 20).fit(x).transform(x[:5] + 0.1)


_umap_compiled = threading.Event()  # set once a UMAP has been fitted in this process


def umap_ready() -> bool:
    """Whether this process has compiled UMAP's code (``prepare_umap`` or a projection has run)."""
    return _umap_compiled.is_set()


def project(real, others: dict | None = None, method: str = "pca", seed: int = 0, *,
            n_neighbors: int = 15, min_dist: float = 0.1, n_epochs: int | None = 200) -> dict[str, np.ndarray]:
    """2-D coordinates of the real features and of each set in ``others``, in one shared space.

    The projection is fitted on the real features only (as in the paper's Figure 3) and the other
    sets are mapped into it, so synthetic samples are seen where the real data would put them.
    ``method``: "pca" (exact, centred on the real mean) or "umap" (umap-learn, ``random_state=seed``;
    ``n_epochs`` 200, umap-learn's own choice for large sets, instead of its 500 for small ones:
    a 2-D picture needs no more, and the layout, most of a fit once compiled, takes 2/5 of the time).
    Results are cached by a hash of the arrays and arguments; a fitted projection is reused when
    only ``others`` change. Returns {"real": (N, 2), name: (M, 2), ...} as float32.
    """
    if method not in ("pca", "umap"):
        raise ValueError(f"method must be pca or umap, got {method!r}")
    others = dict(others or {})
    if "real" in others:
        raise ValueError('"real" is reserved for the real features; name the other sets differently')
    real = _as_features(real)
    arrays = {name: _as_features(x) for name, x in others.items()}
    for name, x in arrays.items():
        if x.shape[1] != real.shape[1]:
            raise ValueError(f"{name!r} has {x.shape[1]} features, the real set {real.shape[1]}")
    if method == "umap" and len(real) <= n_neighbors:
        raise ValueError(f"UMAP needs more than n_neighbors={n_neighbors} real samples, got {len(real)}")
    params = (method, int(seed), int(n_neighbors), float(min_dist), n_epochs) if method == "umap" else (method,)
    fit_key = _digest(real, *params)
    key = _digest(fit_key, *[p for name in sorted(arrays) for p in (name, arrays[name])])
    cached = _results.get(key)
    if cached is None:
        projector = _fitted.get(fit_key)
        if projector is None:
            projector = (_PCA() if method == "pca" else _UMAP(seed, n_neighbors, min_dist, n_epochs)).fit(real)
            _fitted.put(fit_key, projector)
        cached = {"real": projector.embedding}
        cached.update({name: projector.transform(x) if len(x) else np.zeros((0, 2), np.float32)
                       for name, x in arrays.items()})
        _results.put(key, cached)
    return {"real": cached["real"].copy(), **{name: cached[name].copy() for name in others}}


def clear_projection_cache() -> None:
    _results.clear()
    _fitted.clear()

# --------------------------------------------------------------------------- boundary and coverage


def margin(probs) -> np.ndarray:
    """Top-1 minus top-2 probability per sample, (N,): 0 on the decision boundary, 1 far from it."""
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be (N, C), got shape {p.shape}")
    if p.shape[1] == 1:
        return p[:, 0].copy()
    top2 = np.partition(p, -2, axis=1)[:, -2:]  # (N, 2): second largest, largest
    return top2[:, 1] - top2[:, 0]


BOUNDARY_THRESHOLD = 0.2  # the default margin under which a sample counts as near the boundary (Feature space)


def boundary_share(probs, threshold: float) -> float:
    """Share of samples whose margin is below ``threshold`` (0.0 for no samples)."""
    m = margin(probs)
    return float(np.mean(m < threshold)) if len(m) else 0.0


def knn_coverage(real, synthetic, k: int = 5) -> float:
    """Coverage of Naeem et al. 2020: share of real samples whose k-NN ball holds a synthetic sample.

    The ball around a real sample has the radius of its distance to its k-th nearest other real
    sample; a synthetic sample on the sphere counts as inside. 1.0: synthetic features reach every
    region of the real feature space; 0.0: they reach none.
    """
    from sklearn.neighbors import NearestNeighbors
    real, synthetic = _as_features(real), _as_features(synthetic)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(real) <= k:
        raise ValueError(f"coverage with k={k} needs more than {k} real samples, got {len(real)}")
    if len(synthetic) == 0:
        return 0.0
    # k + 1 neighbours of each real sample among the real ones: the first is the sample itself.
    radius = kth_radii(real, k)
    nearest = NearestNeighbors(n_neighbors=1).fit(synthetic).kneighbors(real)[0][:, 0]
    return float(np.mean(nearest <= radius * (1 + 1e-6)))  # tolerance: float rounding of equal distances

def kth_radii(x, k: int) -> np.ndarray:
    """Each sample's distance to its k-th nearest other sample of ``x`` (N, D)."""
    from sklearn.neighbors import NearestNeighbors
    x = _as_features(x)
    return NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)[0][:, k]


def prdc(real, synthetic, k: int = 5, chunk: int = 2048, real_radii: np.ndarray | None = None) -> dict:
    """Precision, recall, density and coverage of Naeem et al. 2020 ("Reliable Fidelity and Diversity
    Metrics for Generative Models"), on feature vectors (N, D). A real sample's ball has the radius of its
    distance to its k-th nearest other real sample (a synthetic ball likewise among synthetic samples);
    a point on a sphere counts as inside.

    precision: share of synthetic samples inside some real ball; recall: share of real samples inside some
    synthetic ball; density: the real balls holding a synthetic sample, counted with repeats, / k, averaged
    over synthetic samples (about 1 for synthetic samples distributed like the real ones); coverage: share of
    real samples whose ball holds a synthetic sample. Real against other real samples of one distribution
    gives values near 1; a collapsed generator a high precision and a low recall and coverage.
    ``real_radii``: the real samples' k-NN radii (``kth_radii(real, k)``), when measured against them before.
    """
    real, synthetic = _as_features(real), _as_features(synthetic)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(real) <= k or len(synthetic) <= k:
        raise ValueError(f"precision, recall, density and coverage with k={k} need more than {k} real and "
                         f"synthetic samples, got {len(real)} and {len(synthetic)}")
    if real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"real and synthetic features differ in width: {real.shape[1]} and {synthetic.shape[1]}")
    tol = 1 + 1e-6  # float rounding of equal distances
    r_real = (kth_radii(real, k) if real_radii is None else np.asarray(real_radii)) * tol
    r_syn = kth_radii(synthetic, k) * tol
    in_real_balls = np.zeros(len(synthetic), dtype=np.int64)   # per synthetic sample: real balls holding it
    covered = np.zeros(len(real), dtype=bool)                  # per real sample: its ball holds a synthetic one
    recalled = np.zeros(len(real), dtype=bool)                 # per real sample: inside some synthetic ball
    for i in range(0, len(real), chunk):
        d = _distances(real[i:i + chunk], synthetic)           # (chunk, N_syn)
        inside = d <= r_real[i:i + chunk, None]
        in_real_balls += inside.sum(axis=0)
        covered[i:i + chunk] = inside.any(axis=1)
        recalled[i:i + chunk] = (d <= r_syn[None, :]).any(axis=1)
    return {"precision": float(np.mean(in_real_balls > 0)), "recall": float(recalled.mean()),
            "density": float(in_real_balls.mean() / k), "coverage": float(covered.mean())}


def class_spread(features, labels) -> dict:
    """How far apart the features of one class lie, needing no real images.

    spread: mean Euclidean distance between two samples of one class, averaged over the classes with at
    least two samples; centres: mean distance between two class centres; ratio: spread / centres (a
    scale-free number: near 0 when each class is one point, near 1 or more when classes overlap).
    """
    x = _as_features(features)
    y = np.asarray(labels)
    if y.ndim == 2:  # (N, K) labels of superposed samples: the first (a plain sample's only) class
        y = y[:, 0]
    if len(y) != len(x):
        raise ValueError(f"{len(x)} features but {len(y)} labels")
    spreads, centres = [], []
    for c in np.unique(y):
        members = x[y == c]
        centres.append(members.mean(axis=0))
        if len(members) >= 2:
            d = _distances(members, members)
            n = len(members)
            spreads.append(float(d.sum()) / (n * (n - 1)))
    if not spreads:
        raise ValueError("no class has two samples: a spread needs pairs")
    spread = float(np.mean(spreads))
    centre_d = float(_distances(np.stack(centres), np.stack(centres)).sum()) / max(len(centres) * (len(centres) - 1), 1)
    return {"spread": spread, "centres": centre_d, "ratio": spread / centre_d if centre_d > 0 else float("inf")}


def dominant_labels(labels, coeffs) -> np.ndarray:
    """Each sample's class with the largest mixing coefficient, (N,)."""
    labels, coeffs = np.asarray(labels), np.asarray(coeffs)
    if labels.ndim == 1:
        return labels
    return labels[np.arange(len(labels)), coeffs.argmax(axis=1)]


def diversity(synthetic: dict, real: dict | None = None, k: int = 5, real_radii: np.ndarray | None = None) -> dict:
    """The diversity figures of synthetic samples (a ``synthetic_features`` result), beside real ones
    (a ``real_features`` result) when given: spread and spread_ratio (``class_spread``, by each sample's
    dominant class) always; with real samples also precision, recall, density, coverage (``prdc``) and
    spread_vs_real (the synthetic within-class spread over the real one: 1 means as varied as real images)."""
    own = class_spread(synthetic["features"], dominant_labels(synthetic["labels"], synthetic["coeffs"]))
    out = {"spread": own["spread"], "spread_ratio": own["ratio"]}
    if real is not None:
        out.update(prdc(real["features"], synthetic["features"], k, real_radii=real_radii))
        out["spread_vs_real"] = own["spread"] / class_spread(real["features"], real["labels"])["spread"]
    return out


def generator_diversity(generator: Generator, teacher, real: dict, n: int, superpose_k: int = 2, seed: int = 0,
                        real_radii: np.ndarray | None = None, boundary: float | None = None) -> dict:
    """``diversity`` of ``n`` plain samples of ``generator`` (``"plain"``) and, where it can mix classes (a
    Qimera generator of several classes), of ``n`` superposed ones with K = max(2, ``superpose_k``)
    (``"superposed"``), against ``real`` (a ``real_features`` result; ``real_radii`` its k-th neighbour
    radii, when computed before). Samples are drawn from ``seed`` alone, as ``synthetic_features`` draws them.
    With a ``boundary`` threshold each kind also gets ``near_boundary``: the ``boundary_share`` of its samples."""
    kinds = [("plain", False)]
    if generator.input_mode != "gdfq" and generator.num_classes > 1:
        kinds.append(("superposed", True))
    out = {}
    for name, superposed in kinds:
        samples = synthetic_features(generator, teacher, n, superposed, seed=seed,
                                     k=max(2, superpose_k) if superposed else 1)
        out[name] = diversity(samples, real, real_radii=real_radii)
        if boundary is not None:
            out[name]["near_boundary"] = boundary_share(samples["probs"], boundary)
    return out


# --------------------------------------------------------------------------- the mixing path


@torch.no_grad()
def generate_from_input(generator: Generator, z: torch.Tensor, labels, coeffs) -> torch.Tensor:
    """Images from explicit generator input vectors ``z`` (B, D_in) instead of the generator's own latent.

    Runs the generator's forward with its input replaced, in eval mode. ``labels`` and ``coeffs``
    (B, K) only matter for class-conditional BatchNorms. The generator itself is not changed: a
    shallow copy (sharing every weight) carries the replaced input.
    """
    device = next(generator.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    coeffs = torch.as_tensor(coeffs, dtype=torch.float32, device=device)
    z = z.to(device)
    was_training = generator.training
    generator.eval()
    try:
        body = copy.copy(generator)
        body.latent = lambda *_: z
        return body(labels, coeffs, None)
    finally:
        generator.train(was_training)


@torch.no_grad()
def latent_interpolation(generator: Generator, class_a: int, class_b: int, alphas, seed: int = 0) -> torch.Tensor:
    """Images along a straight line between the generator inputs of class A and class B.

    This is an interpolation of the input vectors, not Qimera's superposition: for GDFQ's input
    E[y] * z, (1 - alpha) * E[a] * z + alpha * E[b] * z with one noise vector z for the whole path.
    Works for either input mode; endpoints are the plain images of class A and class B with that noise.
    """
    alphas = torch.as_tensor(np.asarray(alphas, dtype=np.float32))
    s = len(alphas)
    device = next(generator.parameters()).device
    noise = seeded_noise([seed], 1, generator.embed_dim, device).expand(s, 1, -1)  # (S, 1, D)
    one = torch.ones(s, 1, device=device)
    za = generator.latent(torch.full((s, 1), class_a, device=device), one, noise)  # (S, D_in)
    zb = generator.latent(torch.full((s, 1), class_b, device=device), one, noise)
    a = alphas.to(device)[:, None]
    z = (1 - a) * za + a * zb
    labels = torch.tensor([[class_a, class_b]], device=device).expand(s, 2)
    coeffs = torch.stack([1 - alphas, alphas], dim=1)
    return generate_from_input(generator, z, labels, coeffs)


def crossing_point(alphas, p_a, p_b) -> float | None:
    """The first alpha where p_b exceeds p_a, linearly interpolated between steps; None if never."""
    d = np.asarray(p_b, dtype=np.float64) - np.asarray(p_a, dtype=np.float64)
    alphas = np.asarray(alphas, dtype=np.float64)
    above = np.flatnonzero(d > 0)
    if len(above) == 0:
        return None
    i = int(above[0])
    if i == 0:
        return float(alphas[0])
    t = -d[i - 1] / (d[i] - d[i - 1])  # d[i - 1] <= 0 < d[i], so t in [0, 1)
    return float(alphas[i - 1] + t * (alphas[i] - alphas[i - 1]))


def decision_boundary(alphas, probs) -> dict | None:
    """Where the teacher's top-1 class first changes along a path: ``{"alpha", "from", "to"}``, the
    alpha interpolated between the two steps where p(to) overtakes p(from); None if it never changes.

    This is the decision boundary whatever class wins after it: on a path from A to B the top-1
    may change to a third class while p(B) stays low."""
    probs = np.asarray(probs, dtype=np.float64)
    alphas = np.asarray(alphas, dtype=np.float64)
    pred = probs.argmax(1)
    changed = np.flatnonzero(pred != pred[0])
    if len(changed) == 0:
        return None
    i = int(changed[0])
    c0, c1 = int(pred[0]), int(pred[i])
    alpha = crossing_point(alphas[i - 1:i + 1], probs[i - 1:i + 1, c0], probs[i - 1:i + 1, c1])
    return {"alpha": float(alphas[i]) if alpha is None else alpha, "from": c0, "to": c1}


@torch.no_grad()
def path_strip(generator: Generator, teacher, student, class_a: int, class_b: int, steps: int = 11,
               seed: int = 0) -> dict:
    """Images along the mixing path from class A to class B, and what teacher and student make of them.

    Qimera generator: superposed samples with labels (A, B), coefficients (1 - alpha, alpha) and one
    fixed seed (METHOD 4). GDFQ generator (no superposition): ``latent_interpolation`` instead, an
    interpolation of the generator input, not superposition. ``student`` may be None.
    boundary: where the teacher's top-1 class first changes (``decision_boundary``), None if never;
    p_other / other_class: per step, the probability and index of the strongest class that is
    neither A nor B (a path can cross into a third class).
    """
    for c in (class_a, class_b):
        if not 0 <= c < generator.num_classes:
            raise ValueError(f"class {c} out of range [0, {generator.num_classes})")
    if steps < 2:
        raise ValueError(f"a path needs at least 2 steps, got {steps}")
    alphas = np.linspace(0.0, 1.0, steps)
    if generator.input_mode == "gdfq":
        images = latent_interpolation(generator, class_a, class_b, alphas, seed)
    else:
        coeffs = np.stack([1 - alphas, alphas], axis=1)
        images = generate_images(generator, [[class_a, class_b]] * steps, coeffs, [seed] * steps)
    images = images.cpu()
    _, p = collect_features(teacher.model, images)
    others = p.clone()
    others[:, [class_a, class_b]] = -1.0
    p_other, other_class = others.max(1)
    out = {"alphas": alphas, "images": images, "p_a": p[:, class_a].numpy(), "p_b": p[:, class_b].numpy(),
           "p_other": p_other.numpy(), "other_class": other_class.numpy(),
           "teacher_pred": p.argmax(1).numpy(), "student_p_a": None, "student_p_b": None, "student_pred": None}
    if student is not None:
        _, q = collect_features(student, images)
        out.update(student_p_a=q[:, class_a].numpy(), student_p_b=q[:, class_b].numpy(),
                   student_pred=q.argmax(1).numpy())
    out["boundary"] = decision_boundary(alphas, p.numpy())
    return out

def normalise_coefficients(weights) -> np.ndarray:
    """Slider values -> coefficients on the simplex (all zero -> equal weights)."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    return np.full(len(w), 1.0 / len(w)) if w.sum() <= 0 else w / w.sum()


@torch.no_grad()
def mix_samples(generator, teacher_model, student, classes: list[int], coeffs, seeds: list[int]) -> dict:
    """Images mixing ``classes`` with ``coeffs`` for each seed; teacher and student read them.

    Returns images (B, C, H, W) normalised, teacher_probs / student_probs (B, num_classes),
    teacher_pred / student_pred (B,).
    """
    coeffs = normalise_coefficients(coeffs)
    if generator.input_mode == "gdfq" and len(classes) > 1:
        raise ValueError("a GDFQ generator takes one class per image: it cannot mix classes")
    b = len(seeds)
    labels = torch.tensor([list(classes)] * b)
    lam = torch.tensor(np.tile(coeffs, (b, 1)), dtype=torch.float32)
    x = generate_images(generator, labels, lam, seeds)
    _, t_probs = collect_features(teacher_model, x)
    out = {"images": x, "teacher_probs": t_probs.numpy(), "teacher_pred": t_probs.argmax(1).numpy()}
    if student is not None:
        _, s_probs = collect_features(student, x)
        out.update(student_probs=s_probs.numpy(), student_pred=s_probs.argmax(1).numpy())
    return out

# --------------------------------------------------------------------------- display


def to_display(images, teacher) -> np.ndarray:
    """Normalised images (N, C, H, W) back to (N, H, W, C) uint8 with the teacher's mean and std."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() == 3:
        x = x[None]
    mean = torch.tensor(teacher.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(teacher.std, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x * std + mean).clamp_(0, 1).mul_(255).round_()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def image_spread(images, teacher, grid: int | None = None) -> float:
    """How different a set of images is: the mean distance between two of them, root-mean-square over the
    pixels in display values from 0 to 1 (0: all the same image; two CIFAR-10 test images of one class are
    about 0.3 apart). ``images``: normalised (N, C, H, W), N >= 2. ``grid``: compare the images' layouts
    instead (``losses.layout``: their means over a grid x grid grid of blocks), so that images differing
    only in detail count as alike (eight real CIFAR-10 cats: about 0.3 apart at grid 4)."""
    pix = torch.from_numpy(to_display(images, teacher)).float().div(255).permute(0, 3, 1, 2)
    if len(pix) < 2:
        raise ValueError("image_spread needs at least two images")
    pix = layout(pix, grid) if grid else pix.flatten(1)
    i, j = torch.triu_indices(len(pix), len(pix), 1)
    return float(((pix[i] - pix[j]).pow(2).mean(1).sqrt()).mean())
