"""qimera_engine.analysis: margins, coverage, projections, synthetic features and mixing paths."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from qimera_engine import InputSpec, analysis, generate_images, load_data, load_generator, load_student, preset, run_to_end
from qimera_engine.analysis import boundary_share, crossing_point, knn_coverage, margin, project, to_display

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def nets(tmp_path_factory, digits_teacher):
    """A short Qimera run and a shorter GDFQ run on digits, in temporary folders."""
    out = {}
    for method, iters in (("qimera", 20), ("gdfq", 5)):
        folder = tmp_path_factory.mktemp(f"analysis-{method}")
        run_to_end(preset("digits", method=method, epochs=2, iters_per_epoch=iters, warmup_epochs=1,
                          calib_epochs=1, batch_size=32), out=folder)
        out[method] = load_generator(folder)
        out[f"{method}-student"] = load_student(folder, digits_teacher)
    out["teacher"] = digits_teacher
    return out


def _blobs(n_per: int, centres, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(size=(n_per, dim)) + c for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(len(centres)), n_per)

# --------------------------------------------------------------------------- margin and boundary share


def test_importing_analysis_loads_neither_umap_nor_streamlit():
    code = "import sys, qimera_engine.analysis; print('umap' in sys.modules, 'streamlit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]



def test_margin_and_boundary_share_on_hand_made_probabilities():
    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [0.05, 0.9, 0.05], [0.625, 0.125, 0.25]])
    np.testing.assert_allclose(margin(p), [0.5, 0.0, 0.85, 0.375], atol=1e-12)
    np.testing.assert_allclose(margin(torch.tensor(p)), margin(p), atol=1e-7)
    assert boundary_share(p, 0.4) == pytest.approx(0.5)
    assert boundary_share(p, 0.375) == pytest.approx(0.25)  # strictly below: 0.375 itself is not
    assert boundary_share(p, 1.01) == 1.0 and boundary_share(p, 0.0) == 0.0
    assert boundary_share(np.zeros((0, 3)), 0.5) == 0.0
    np.testing.assert_allclose(margin(np.array([[1.0], [0.3]])), [1.0, 0.3])
    with pytest.raises(ValueError):
        margin(np.array([0.5, 0.5]))

# --------------------------------------------------------------------------- coverage


def test_knn_coverage_extremes_and_a_hand_computed_case():
    real, _ = _blobs(100, [0, 10, 20])
    assert knn_coverage(real, real, k=5) == 1.0
    assert knn_coverage(real, real + 1000.0, k=5) == 0.0
    assert knn_coverage(real, np.zeros((0, 8)), k=5) == 0.0
    line = np.arange(10, dtype=np.float32)[:, None]  # k = 1: every ball has radius 1
    assert knn_coverage(line, [[0.5]], k=1) == pytest.approx(0.2)  # covers 0 and 1
    assert knn_coverage(line, [[0.5], [9.0]], k=1) == pytest.approx(0.4)  # and 8, 9
    assert knn_coverage(line, [[4.5]], k=2) == pytest.approx(0.2)  # radius 1 inside: 4, 5
    assert knn_coverage(line, [[1.5]], k=2) == pytest.approx(0.3)  # 0 has radius 2: 0, 1, 2
    with pytest.raises(ValueError):
        knn_coverage(line[:3], line, k=3)


def test_knn_coverage_matches_brute_force():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    fake = (rng.normal(size=(200, 16)) * 0.5 + 0.7).astype(np.float32)
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    radius = np.sort(d_rr, axis=1)[:, 5]  # column 0 is the sample itself
    nearest = np.linalg.norm(real[:, None] - fake[None], axis=-1).min(axis=1)
    expected = float(np.mean(nearest <= radius))
    assert 0.05 < expected < 0.95  # a case where the answer is informative
    assert knn_coverage(real, fake, k=5) == pytest.approx(expected, abs=1 / 300)


def test_knn_coverage_of_3000_points_matches_brute_force_and_known_cases():
    from sklearn.metrics import pairwise_distances
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(3000, 64)), rng.normal(size=(3000, 64)) + 0.5
    radius = np.sort(pairwise_distances(real), axis=1)[:, 5]
    expected = float(np.mean(pairwise_distances(real, fake).min(axis=1) <= radius))
    assert 0.05 < expected < 0.95
    assert knn_coverage(real, fake) == pytest.approx(expected, abs=1 / 3000)
    assert knn_coverage(real, real[::-1]) == 1.0  # every real sample is its own synthetic neighbour
    assert knn_coverage(real, fake + 100.0) == 0.0  # all of them far outside every ball

# --------------------------------------------------------------------------- projection


def test_pca_projection_is_centred_and_matches_sklearn():
    from sklearn.decomposition import PCA
    real, _ = _blobs(50, [0, 5, -5], dim=6)
    other = real[:7] + 0.1
    out = project(real, {"plain": other}, method="pca")
    assert set(out) == {"real", "plain"}
    assert out["real"].shape == (150, 2) and out["plain"].shape == (7, 2)
    np.testing.assert_allclose(out["real"].mean(axis=0), 0.0, atol=1e-4)
    ref = PCA(2).fit(real)
    np.testing.assert_allclose(np.abs(out["real"]), np.abs(ref.transform(real)), atol=1e-3)
    np.testing.assert_allclose(np.abs(out["plain"]), np.abs(ref.transform(other)), atol=1e-3)
    assert out["real"][:, 0].var() >= out["real"][:, 1].var()
    # The others are mapped into the real set's space: the real set given as an "other" lands on itself.
    again = project(real, {"copy": real}, method="pca")
    np.testing.assert_allclose(again["copy"], again["real"], atol=1e-5)


def test_projection_cache_returns_fresh_copies_and_rejects_bad_input():
    real, _ = _blobs(30, [0, 4], dim=5)
    first = project(real, {"a": real[:3]})
    first["real"][:] = 123.0
    second = project(real, {"a": real[:3]})
    assert not np.any(second["real"] == 123.0)
    with pytest.raises(ValueError):
        project(real, {"real": real})
    with pytest.raises(ValueError):
        project(real, {"a": np.zeros((3, 4))})
    with pytest.raises(ValueError):
        project(real, {}, method="tsne")


@pytest.mark.slow  # the first UMAP in a process compiles umap-learn's numba code (~10 s on 2 cores)
def test_umap_projection_keeps_clusters_and_caches(monkeypatch):
    import umap
    real, groups = _blobs(80, [0, 12, 24], dim=8)
    other, other_groups = _blobs(20, [0, 12, 24], dim=8, seed=5)
    out = project(real, {"other": other}, method="umap", seed=0)
    assert out["real"].shape == (240, 2) and out["other"].shape == (60, 2)
    assert np.isfinite(out["real"]).all() and np.isfinite(out["other"]).all()
    centres = np.stack([out["real"][groups == g].mean(axis=0) for g in range(3)])
    nearest = np.linalg.norm(out["other"][:, None] - centres[None], axis=-1).argmin(axis=1)
    assert (nearest == other_groups).mean() > 0.95  # new points land in their own cluster
    calls = []
    monkeypatch.setattr(umap, "UMAP", lambda *a, **k: calls.append(a) or pytest.fail("fitted again"))
    again = project(real, {"other": other}, method="umap", seed=0)  # from the cache: no new fit
    np.testing.assert_array_equal(again["other"], out["other"])
    assert calls == []

# --------------------------------------------------------------------------- features


def test_synthetic_features_plain_and_superposed(nets):
    gen, teacher = nets["qimera"], nets["teacher"]
    plain = analysis.synthetic_features(gen, teacher, 60, superposed=False, seed=3, keep_images=True)
    assert plain["features"].shape == (60, 64) and plain["features"].dtype == np.float32
    assert plain["probs"].shape == (60, 10)
    np.testing.assert_allclose(plain["probs"].sum(axis=1), 1.0, atol=1e-5)
    assert plain["labels"].shape == (60, 1) and (plain["coeffs"] == 1).all()
    assert plain["images"].shape == (60, 1, 8, 8)
    mixed = analysis.synthetic_features(gen, teacher, 60, superposed=True, seed=3, k=3)
    assert mixed["labels"].shape == (60, 3) and "images" not in mixed
    np.testing.assert_allclose(mixed["coeffs"].sum(axis=1), 1.0, atol=1e-5)
    assert mixed["labels"].min() >= 0 and mixed["labels"].max() < 10
    # Sample i is remade from its labels, coefficients and seed alone.
    i = 17
    x = generate_images(gen, mixed["labels"][i:i + 1], mixed["coeffs"][i:i + 1], mixed["seeds"][i:i + 1])
    f, _ = analysis.collect_features(teacher.model, x)
    np.testing.assert_allclose(f[0].numpy(), mixed["features"][i], atol=1e-4)
    # The paper's point: superposed samples sit nearer the teacher's decision boundaries.
    assert margin(mixed["probs"]).mean() < margin(plain["probs"]).mean()


def test_synthetic_features_are_reproducible_from_the_seed(nets):
    gen, teacher = nets["qimera"], nets["teacher"]
    torch.manual_seed(0)
    a = analysis.synthetic_features(gen, teacher, 20, superposed=True, seed=7, sampler="dirichlet")
    torch.manual_seed(99)  # the global random state plays no part
    b = analysis.synthetic_features(gen, teacher, 20, superposed=True, seed=7, sampler="dirichlet")
    c = analysis.synthetic_features(gen, teacher, 20, superposed=True, seed=8, sampler="dirichlet")
    for key in ("features", "labels", "coeffs", "seeds"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["coeffs"], c["coeffs"])


def test_gdfq_generator_cannot_superpose(nets):
    with pytest.raises(ValueError, match="GDFQ"):
        analysis.synthetic_features(nets["gdfq"], nets["teacher"], 10, superposed=True)
    plain = analysis.synthetic_features(nets["gdfq"], nets["teacher"], 10, superposed=False)
    assert plain["features"].shape == (10, 64)


def test_real_features_of_the_digits_test_set(digits_teacher):
    data = load_data("digits", InputSpec.of(digits_teacher), "test")
    out = analysis.real_features(digits_teacher, data, 200, seed=1)
    assert out["features"].shape == (200, 64) and out["labels"].shape == (200,)
    np.testing.assert_array_equal(out["labels"], data.subset(200, 1)[1].numpy())
    assert (out["probs"].argmax(axis=1) == out["labels"]).mean() > 0.9  # the teacher knows its digits

# --------------------------------------------------------------------------- mixing path


def test_crossing_point_on_hand_made_curves():
    alphas = [0.0, 0.5, 1.0]
    assert crossing_point(alphas, [0.9, 0.6, 0.2], [0.1, 0.4, 0.8]) == pytest.approx(0.625)
    assert crossing_point(alphas, [0.9, 0.8, 0.7], [0.1, 0.2, 0.3]) is None
    assert crossing_point(alphas, [0.4, 0.3, 0.2], [0.6, 0.7, 0.8]) == 0.0
    assert crossing_point(alphas, [0.9, 0.5, 0.1], [0.1, 0.5, 0.9]) == pytest.approx(0.5)  # a tie is not yet a crossing


def test_decision_boundary_is_where_the_top1_class_changes():
    alphas = np.linspace(0, 1, 5)
    # A -> B: p(B) overtakes p(A) between 0.5 and 0.75
    probs = np.array([[.9, .1, 0], [.8, .2, 0], [.6, .4, 0], [.3, .7, 0], [.1, .9, 0]])
    bd = analysis.decision_boundary(alphas, probs)
    assert bd["from"] == 0 and bd["to"] == 1 and bd["alpha"] == pytest.approx(0.5 + 0.25 * (0.2 / 0.6))
    # a third class wins while p(B) stays at 0.2: the boundary is there, and it is not B's
    probs = np.array([[.8, .1, .1], [.6, .1, .3], [.3, .2, .5], [.2, .2, .6], [.1, .2, .7]])
    bd = analysis.decision_boundary(alphas, probs)
    assert bd["to"] == 2 and 0.25 < bd["alpha"] < 0.5
    assert analysis.decision_boundary(alphas, [[.9, .1]] * 5) is None
    from qimera_engine.ui.logic import boundary_sentence
    text = boundary_sentence({"boundary": bd, "teacher_pred": probs.argmax(1), "p_b": probs[:, 1]}, ["a", "b", "c"], 0, 1)
    assert "from a to c" in text and "third class, not b" in text and "reaches only 0.20" in text
    text = boundary_sentence({"boundary": None, "teacher_pred": [0] * 5, "p_b": [.1] * 5}, ["a", "b", "c"], 0, 1)
    assert "stays a" in text


def test_path_strip_runs_from_class_a_to_class_b(nets):
    gen, teacher, student = nets["qimera"], nets["teacher"], nets["qimera-student"]
    pairs = [(a, b) for a in range(10) for b in range(10) if a != b]
    ends_right = 0
    for a, b in pairs:
        out = analysis.path_strip(gen, teacher, student, a, b, steps=9, seed=2)
        bd, pred = out["boundary"], out["teacher_pred"]
        assert (bd is None) == (pred == pred[0]).all()  # a boundary exactly when the top-1 class changes
        if bd is not None:
            first = int(np.flatnonzero(pred != pred[0])[0])
            assert bd["to"] == pred[first] and out["alphas"][first - 1] <= bd["alpha"] <= out["alphas"][first]
        assert ((out["p_other"] <= 1) & (out["other_class"] != a) & (out["other_class"] != b)).all()
        ends_right += out["teacher_pred"][0] == a and out["teacher_pred"][-1] == b
    assert ends_right >= 0.8 * len(pairs)  # a short run: most, not all, endpoints are clean
    np.testing.assert_allclose(out["alphas"], np.linspace(0, 1, 9))
    assert out["images"].shape == (9, 1, 8, 8)
    assert out["student_pred"].shape == (9,) and out["student_p_a"].shape == (9,)
    # Its endpoints are the superposition's extremes: coefficient 1 on class A, then on class B.
    x = generate_images(gen, [[a, b], [a, b]], [[1.0, 0.0], [0.0, 1.0]], [2, 2])
    torch.testing.assert_close(out["images"][0], x[0])
    torch.testing.assert_close(out["images"][-1], x[1])


def test_path_strip_without_a_student(nets):
    out = analysis.path_strip(nets["qimera"], nets["teacher"], None, 2, 5, steps=3)
    assert out["student_pred"] is None and out["student_p_b"] is None
    with pytest.raises(ValueError):
        analysis.path_strip(nets["qimera"], nets["teacher"], None, 2, 10)


def test_gdfq_path_interpolates_the_generator_input(nets):
    gen = nets["gdfq"]
    out = analysis.path_strip(gen, nets["teacher"], nets["gdfq-student"], 1, 7, steps=5, seed=4)
    assert out["images"].shape == (5, 1, 8, 8)
    bd, pred = out["boundary"], out["teacher_pred"]
    assert (bd is None) == bool((pred == pred[0]).all())  # a boundary exactly when the top-1 class changes
    if bd is not None:
        first = int(np.flatnonzero(pred != pred[0])[0])
        assert bd["to"] == pred[first] and out["alphas"][first - 1] <= bd["alpha"] <= out["alphas"][first]
    # The endpoints are GDFQ's own images of class A and class B with the same noise.
    ends = generate_images(gen, [1, 7], [1.0, 1.0], [4, 4])
    torch.testing.assert_close(out["images"][0], ends[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["images"][-1], ends[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["images"][2], ends[0], atol=1e-3)
    assert "latent" not in vars(gen) and not gen.training  # the shared generator is left as it was

# --------------------------------------------------------------------------- display


def test_to_display_undoes_the_teacher_normalisation(digits_teacher):
    data = load_data("digits", InputSpec.of(digits_teacher), "test")
    raw, _ = data.raw(12, seed=0)
    x, _ = data.subset(12, seed=0)
    shown = to_display(x, digits_teacher)
    assert shown.shape == (12, 8, 8, 1) and shown.dtype == np.uint8
    assert np.abs(shown.astype(int) - raw.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1
    extremes = to_display(torch.tensor([[[[-100.0, 100.0]]]]), digits_teacher)
    assert extremes.ravel().tolist() == [0, 255]
