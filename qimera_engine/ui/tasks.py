"""Slow work the pages hand to background workers (JobRegistry tasks), without Streamlit.

Each ``*_task`` returns ``fn(report, stop)`` for ``JobRegistry.start_task``, and a key that names
its result, so the same request is computed once and shared by every session.
"""
from __future__ import annotations

from pathlib import Path

from .. import (InputSpec, Run, analysis, data_stamp, evaluate, get_teacher, load_data, load_generator, load_teacher,
               open_run, qimera_home, train_and_cache)
from . import paths


def teacher_key(name: str, spec: str, checkpoint: str | None, pretrained: bool, train: bool) -> str:
    """Names one teacher result; it changes with the files behind it (the data set, a checkpoint)."""
    weights = checkpoint
    if checkpoint:
        try:
            st = Path(checkpoint).stat()
            weights = f"{checkpoint}@{st.st_size}@{st.st_mtime_ns}"
        except OSError:
            weights = f"{checkpoint}@missing"
    return f"teacher|{qimera_home()}|{name}|{spec}@{data_stamp(spec)}|{weights}|{pretrained}|{train}"


def teacher_task(name: str, spec: str, checkpoint: str | None = None, pretrained: bool = False,
                 download: bool = False, train: bool = False):
    """Load (or train, then cache) a teacher and measure its FP top-1 on the test split."""
    def work(report, stop):
        report(0.05, "preparing the teacher")
        if train:
            teacher = train_and_cache(name, spec, log=lambda s: report(0.3, s))
        else:
            teacher = get_teacher(name, spec, checkpoint, pretrained, log=lambda s: report(0.3, s))
        report(0.6, "reading the test set")
        test = load_data(spec, InputSpec.of(teacher), "test", download)
        if test.num_classes != teacher.num_classes:
            raise ValueError(f"{spec} has {test.num_classes} classes but teacher {name} has {teacher.num_classes}")
        report(0.7, f"evaluating on {len(test)} test images")
        top1 = evaluate(teacher.model, test)["top1"]
        return {"teacher": name, "data": spec, "top1": top1, "classes": test.num_classes, "n_test": len(test),
                "info": dict(teacher.info), "feature_dim": teacher.feature_dim}
    return work


def features_key(run: Run, gdfq: Run | None, n: int, seed: int, method: str) -> str:
    def stamp(r):
        p = r.path / Run.GENERATOR
        return f"{r.path}@{p.stat().st_mtime if p.exists() else 0}"
    return f"features|{stamp(run)}|{stamp(gdfq) if gdfq else None}|{n}|{seed}|{method}"


_features = analysis.LRUCache(4)  # (run, gdfq, n, seed) -> (sources, classes): PCA and UMAP share their samples


def features_task(run_path: str, gdfq_path: str | None, n: int, seed: int, method: str):
    """Real, plain, superposed (and GDFQ) features of a run's teacher, projected to 2-D.

    Result: per source ``features``, ``probs``, ``labels`` (N, K), ``coeffs`` (N, K), and ``xy`` (N, 2).
    The features of the last few requests are kept, so another projection of the same samples (UMAP
    after PCA) only fits the projection.
    """
    def work(report, stop):
        run = open_run(run_path)
        key = features_key(run, open_run(gdfq_path) if gdfq_path else None, n, seed, "")  # any projection
        cached = _features.get(key)
        if cached is None:
            cached = _sources(run, gdfq_path, n, seed, report, stop)
            if stop.is_set():
                return None
            _features.put(key, cached)
        sources, test_classes = cached
        report(0.6, f"fitting {method.upper()} on the real features" + (" (UMAP takes a while)" if method == "umap" else ""))
        xy = analysis.project(sources["real"]["features"],
                              {k: v["features"] for k, v in sources.items() if k != "real"}, method=method, seed=seed)
        return {"sources": {k: {**v, "xy": xy[k]} for k, v in sources.items()}, "classes": test_classes,
                "method": method, "seed": seed, "n": n}
    return work


def _sources(run: Run, gdfq_path: str | None, n: int, seed: int, report, stop) -> tuple[dict, list[str]]:
    """Each source's features; stops between sources once ``stop`` is set (the caller then drops them)."""
    # the page checks first; a task started otherwise still reads nothing outside the app's folders
    for r in (run, *([open_run(gdfq_path)] if gdfq_path else [])):
        paths.check_run(r)
    paths.check_data_spec(run.config.test_data)
    report(0.05, "loading the teacher and generator")
    teacher = load_teacher(run)
    gen = load_generator(run)
    cfg = run.config
    report(0.15, f"real features ({n} test images, and as many others for the real-vs-real reference)")
    test = load_data(cfg.test_data, InputSpec.of(teacher), "test")
    first, other = analysis.real_and_others(teacher, test, n, seed)
    real = analysis.as_one_class(first)  # the real source, and other real images for the real-vs-real figures
    real["other_features"], real["other_labels"] = other["features"], other["labels"]
    sources = {"real": real}
    if stop.is_set():
        return sources, test.classes
    report(0.3, "plain synthetic features")
    sources["plain"] = analysis.synthetic_features(gen, teacher, n, superposed=False, seed=seed)
    if gen.input_mode != "gdfq" and not stop.is_set():
        report(0.4, "superposed synthetic features")
        k = max(2, min(cfg.superpose_k, gen.num_classes))
        sources["superposed"] = analysis.synthetic_features(gen, teacher, n, superposed=True, seed=seed, k=k)
    if gdfq_path and not stop.is_set():
        report(0.5, "GDFQ's synthetic features")
        sources["gdfq"] = analysis.synthetic_features(load_generator(gdfq_path), teacher, n, superposed=False,
                                                      seed=seed)
    return sources, test.classes


UMAP_PREPARE_KEY = "umap|prepare"


def prepare_umap_task():
    """Import umap and compile its code (see analysis.prepare_umap), so a first UMAP is quick."""
    def work(report, stop):
        report(0.1, "compiling UMAP's code in the background")
        try:
            analysis.prepare_umap()
        except ImportError:  # umap-learn not installed: the page says so when UMAP is chosen
            return {"prepared": False}
        return {"prepared": True}
    return work
