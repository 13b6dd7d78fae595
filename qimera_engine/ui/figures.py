"""Figure and image builders for the app: plotly figures and uint8 arrays, no Streamlit.

Each function takes plain arrays and dicts, so tests can check what a chart or image holds.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

# Colour-blind-safe palette (plotly's qualitative "Safe"), cycled for many classes.
SAFE = ["#88CCEE", "#CC6677", "#DDCC77", "#117733", "#332288", "#AA4499", "#44AA99", "#999933", "#882255",
        "#661100", "#6699CC", "#888888"]
# legends of line charts stand to the right of the plot, clear of the axis titles (a horizontal legend
# under the plot lies over the x-axis title)
LEGEND = dict(orientation="v", x=1.02, xanchor="left", y=1.0, yanchor="top")
# ... or, where the plot needs the full width (the path, whose images sit above their points), at the foot of
# the figure, under the x-axis title (the figure's bottom margin leaves room for two rows)
LEGEND_BELOW = dict(orientation="h", yref="container", y=0.0, yanchor="bottom", x=0.0, xanchor="left")
SOURCE_SYMBOLS = {"real": "circle-open", "plain": "diamond", "superposed": "x", "gdfq": "square"}


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

# --------------------------------------------------------------------------- images


def to_display(x, mean, std) -> np.ndarray:
    """Normalised images (B, C, H, W) -> displayable floats (B, H, W, C) in [0, 1]."""
    x = _np(x).astype(np.float32)
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return np.clip(x * s + m, 0.0, 1.0).transpose(0, 2, 3, 1)


MIN_IMAGE_PX = 96


def image_grid(images, ncols: int = 8, *, mean=None, std=None, scale: int | None = None, pad: int = 1) -> np.ndarray:
    """A grid of images as one uint8 RGB array (H, W, 3).

    ``images``: uint8 (B, C, H, W) as stored, or normalised floats with ``mean``/``std`` given.
    Small images are enlarged by an integer ``scale`` (nearest neighbour, so pixels stay sharp;
    default: to at least ``MIN_IMAGE_PX`` pixels, 96: 8x8 digits x12, 32x32 CIFAR x3).
    """
    arr = _np(images)
    if arr.ndim != 4 or len(arr) == 0:
        raise ValueError(f"expected a (B, C, H, W) batch of at least one image, got shape {arr.shape}")
    if mean is not None:
        f = to_display(arr, mean, std)
    else:
        f = arr.transpose(0, 2, 3, 1).astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
    if f.shape[-1] == 1:
        f = np.repeat(f, 3, axis=-1)
    b, h, w, _ = f.shape
    scale = scale or max(1, -(-MIN_IMAGE_PX // max(h, w)))
    f = f.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    ncols = max(1, min(ncols, b))
    nrows = -(-b // ncols)
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), np.float32)
    for i in range(b):
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = f[i]
    return (grid * 255).round().astype(np.uint8)

# --------------------------------------------------------------------------- training progress


def loss_figure(loss_history: list[dict], keys=("loss_g", "ce_g", "bns", "loss_s", "kd", "ce_s")) -> go.Figure:
    """Losses against the global step (from the job's live record or metrics rows with ``step``)."""
    fig = go.Figure()
    steps = [p["step"] for p in loss_history]
    for k in keys:
        ys = [p.get(k) for p in loss_history]
        if any(y not in (None, 0, 0.0) for y in ys):
            fig.add_trace(go.Scatter(x=steps, y=ys, mode="lines", name=k))
    fig.update_layout(title="Losses", xaxis_title="step", yaxis_title="loss", height=300,
                      margin=dict(l=10, r=10, t=40, b=10), legend=LEGEND)
    return fig


def accuracy_figure(metrics: list[dict], fp_top1: float | None = None) -> go.Figure:
    """The student's top-1 after each epoch, with the FP teacher as a reference line."""
    fig = go.Figure()
    epochs = [r["epoch"] + 1 for r in metrics]
    fig.add_trace(go.Scatter(x=epochs, y=[r["top1"] for r in metrics], mode="lines+markers", name="student top-1"))
    if metrics and "best_top1" in metrics[0]:
        fig.add_trace(go.Scatter(x=epochs, y=[r["best_top1"] for r in metrics], mode="lines", name="best so far",
                                 line=dict(dash="dot")))
    if fp_top1 is not None:
        fig.add_hline(y=fp_top1, line_dash="dash", line_color="gray", annotation_text=f"FP teacher {fp_top1:.2f}%")
    fig.update_layout(title="Test accuracy", xaxis_title="epoch", yaxis_title="top-1 (%)", height=300,
                      margin=dict(l=10, r=10, t=40, b=10), legend=LEGEND)
    return fig

def overlay_figure(curves: dict[str, list[dict]], fp_top1: dict[str, float] | None = None) -> go.Figure:
    """Several runs' top-1 per epoch on one chart and one y-axis (one line per run label)."""
    fig = go.Figure()
    for i, (label, metrics) in enumerate(curves.items()):
        fig.add_trace(go.Scatter(x=[r["epoch"] + 1 for r in metrics], y=[r["top1"] for r in metrics],
                                 mode="lines+markers", name=label, line=dict(color=SAFE[i % len(SAFE)])))
    for value in sorted(set((fp_top1 or {}).values())):
        fig.add_hline(y=value, line_dash="dash", line_color="gray", annotation_text=f"FP teacher {value:.2f}%")
    fig.update_layout(title="Test accuracy per epoch", xaxis_title="epoch", yaxis_title="top-1 (%)", height=340,
                      margin=dict(l=10, r=10, t=40, b=10), legend=LEGEND)
    return fig

# --------------------------------------------------------------------------- boundary samples


def probability_figure(probs, classes: list[str], row_labels: list[str] | None = None) -> go.Figure:
    """Teacher's class probabilities, one row per generated image (a heatmap)."""
    p = _np(probs)
    rows = row_labels or [f"image {i + 1}" for i in range(len(p))]
    fig = go.Figure(go.Heatmap(z=p, x=list(classes), y=rows, zmin=0, zmax=1, colorscale="Blues",
                               texttemplate="%{z:.2f}", textfont=dict(size=11),
                               hovertemplate="%{y}, class %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title="Teacher's class probabilities", height=60 + 28 * len(p), xaxis_title="class",
                      margin=dict(l=10, r=10, t=40, b=10), yaxis=dict(autorange="reversed"),
                      xaxis=dict(type="category"))  # class names like "0".."9" are labels, not numbers
    return fig


def _png_uri(image: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def path_figure(path: dict, name_a: str, name_b: str, names: list[str] | None = None,
                tiles: list[np.ndarray] | None = None, *, height: int | None = None,
                image_share: float = 0.34) -> go.Figure:
    """p(A), p(B) and the strongest other class along the path A -> B; where the teacher's top-1
    class changes marked; teacher/student disagreement shaded. ``tiles`` (one uint8 HxWx3 image per
    step) are drawn above the curves, each centred on its own step of the x-axis, in the top
    ``image_share`` of the plot; ``height`` in pixels (default 530 with tiles, 380 without)."""
    alphas = _np(path["alphas"]).astype(float)
    fig = go.Figure()
    spacing = (alphas[1] - alphas[0]) if len(alphas) > 1 else 1.0
    for a, tile in zip(alphas, tiles or []):
        fig.add_layout_image(source=_png_uri(tile), xref="x", yref="paper", x=a, y=1.0, sizex=spacing,
                             sizey=image_share, xanchor="center", yanchor="top", sizing="contain", layer="above")
    fig.add_trace(go.Scatter(x=alphas, y=_np(path["p_a"]), mode="lines+markers", name=f"teacher p({name_a})",
                             line=dict(color=SAFE[1])))
    fig.add_trace(go.Scatter(x=alphas, y=_np(path["p_b"]), mode="lines+markers", name=f"teacher p({name_b})",
                             line=dict(color=SAFE[4])))
    if path.get("p_other") is not None:
        fig.add_trace(go.Scatter(x=alphas, y=_np(path["p_other"]), mode="lines", name="teacher p(any other class)",
                                 line=dict(color="grey", dash="dash")))
    for key, name, color in (("student_p_a", name_a, SAFE[1]), ("student_p_b", name_b, SAFE[4])):
        if path.get(key) is not None:
            fig.add_trace(go.Scatter(x=alphas, y=_np(path[key]), mode="lines", name=f"student p({name})",
                                     line=dict(color=color, dash="dot")))
    tp, sp = _np(path.get("teacher_pred") if path.get("teacher_pred") is not None else []), \
        _np(path.get("student_pred") if path.get("student_pred") is not None else [])
    if len(tp) == len(alphas) and len(sp) == len(alphas):
        step = (alphas[1] - alphas[0]) / 2 if len(alphas) > 1 else 0.05
        for a, t, s in zip(alphas, tp, sp):
            if t != s:
                fig.add_vrect(x0=a - step, x1=a + step, fillcolor="orange", opacity=0.2, line_width=0)
    boundary = path.get("boundary")
    if boundary is not None:
        to = names[boundary["to"]] if names else str(boundary["to"])
        fig.add_vline(x=float(boundary["alpha"]), line_dash="dash", line_color="black",
                      annotation_text=f"top-1 → {to} at {float(boundary['alpha']):.2f}")
    fig.update_layout(title=f"From {name_a} (0) to {name_b} (1)", xaxis_title=f"coefficient of {name_b}",
                      yaxis_title="probability", yaxis_range=[0, 1.02], height=height or 380,
                      margin=dict(l=10, r=10, t=40, b=90), legend=LEGEND_BELOW)
    if tiles:  # the images take the top third, the curves the rest, on one shared x-axis
        fig.update_layout(height=height or 530, yaxis_domain=[0, round(0.96 - image_share, 4)],
                          xaxis_range=[alphas[0] - spacing / 2, alphas[-1] + spacing / 2])
    return fig

# --------------------------------------------------------------------------- feature space


def feature_scatter(coords: dict, labels: dict, classes: list[str], hover: dict | None = None,
                    title: str = "") -> go.Figure:
    """2-D projections coloured by class and marked by source.

    ``coords[source]``: (N, 2); ``labels[source]``: (N,) class index (the largest coefficient for
    superposed samples); ``hover[source]``: (N,) extra text, e.g. the mixing coefficients.
    One trace per (source, class) holds the points (named "source: class"); the legend has one entry
    per class, which shows or hides that class in every source, and a second legend names the
    sources' marker shapes, so it stays short (14 entries for CIFAR-10, not 40).
    """
    fig = go.Figure()
    seen: set[int] = set()
    for source, xy in coords.items():
        xy, lab = _np(xy), _np(labels[source]).astype(int)
        extra = np.asarray(hover[source]) if hover and source in hover else np.full(len(xy), "", dtype=object)
        for c in np.unique(lab):
            m = lab == c
            seen.add(int(c))
            fig.add_trace(go.Scattergl(
                x=xy[m, 0], y=xy[m, 1], mode="markers", name=f"{source}: {classes[c]}", legendgroup=classes[c],
                showlegend=False,
                # real: open rings in the class colour; synthetic: filled shapes with a dark edge, so the two
                # kinds tell apart at a glance whatever the class colours
                marker=dict(color=SAFE[c % len(SAFE)], symbol=SOURCE_SYMBOLS.get(source, "circle"),
                            size=6 if source == "real" else 8, opacity=0.6 if source == "real" else 0.95,
                            line=dict(width=1, color=SAFE[c % len(SAFE)] if source == "real" else "#222222")),
                customdata=np.stack([np.full(m.sum(), source, dtype=object), np.full(m.sum(), classes[c], dtype=object),
                                     extra[m], np.flatnonzero(m)], axis=1),  # last: index within its source
                hovertemplate="%{customdata[0]}<br>class %{customdata[1]}<br>%{customdata[2]}<extra></extra>"))
    for c in sorted(seen):  # legend entries only: one per class
        fig.add_trace(go.Scattergl(x=[None], y=[None], mode="markers", name=classes[c], legendgroup=classes[c],
                                   marker=dict(color=SAFE[c % len(SAFE)], size=9), hoverinfo="skip"))
    for source in coords:  # and the sources' marker shapes, in a legend of their own
        fig.add_trace(go.Scattergl(x=[None], y=[None], mode="markers", name=source, legend="legend2",
                                   marker=dict(color="grey", symbol=SOURCE_SYMBOLS.get(source, "circle"), size=9,
                                               line=dict(width=1, color="grey" if source == "real" else "#222222")),
                                   hoverinfo="skip"))
    fig.update_layout(title=title, height=560, margin=dict(l=10, r=10, t=40, b=10),
                      legend=dict(itemsizing="constant", title_text="class"),
                      legend2=dict(title_text="source", y=0.0, yanchor="bottom"),
                      xaxis_title="dim 1", yaxis_title="dim 2")
    return fig

# --------------------------------------------------------------------------- bit widths


GAP_FLOOR = 0.01  # points: where the gap view draws a student at or above its teacher (a log axis has no 0)
GAP_TICKS = [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100]  # plain numbers (plotly's log ticks read "5, 2, 10, 5, 2")


def bitwidth_figure(table, fp_top1: float | None = None, value: str = "top1", dotted=(),
                    gap: bool = False) -> go.Figure:
    """Mean top-1 (error bars: std over seeds) against bit width, one line per method; the methods in
    ``dotted`` (baselines) drawn dotted. With ``gap``, the points below FP instead (each run's own FP
    top-1 minus its ``value``) on a log axis, so that gaps of 0.1 and of 50 points both show; a mean gap
    at or below zero is drawn at ``GAP_FLOOR``.

    ``table``: a pandas DataFrame with columns method, bits (e.g. 4 for W4A4), ``value`` (and fp_top1
    with ``gap``).
    """
    fig = go.Figure()
    if len(table):
        if gap:
            table = table.assign(**{value: table["fp_top1"] - table[value]})
        g = table.groupby(["method", "bits"])[value].agg(["mean", "std", "count"]).reset_index()
        for i, (method, part) in enumerate(g.groupby("method")):
            part = part.sort_values("bits")
            lo, hi = int(part["count"].min()), int(part["count"].max())
            y = part["mean"].clip(lower=GAP_FLOOR) if gap else part["mean"]
            what = "%{customdata[1]:.2f} points below FP" if gap else "%{y:.2f}%"
            fig.add_trace(go.Scatter(x=part["bits"], y=y, mode="lines+markers",
                                     name=f"{method} (n = {lo}{'' if lo == hi else f'-{hi}'} per point)",
                                     line=dict(color=SAFE[i % len(SAFE)],
                                               dash="dot" if method in dotted else "solid"),
                                     error_y=dict(type="data", array=part["std"].fillna(0.0), visible=True),
                                     customdata=np.stack([part["count"], part["mean"]], axis=1),
                                     hovertemplate="%{x} bits: " + what + " (%{customdata[0]} runs)<extra>"
                                                   + method + "</extra>"))
    if gap:
        fig.update_layout(title="Points below FP per bit width (log scale)", yaxis_title="FP top-1 minus top-1 (points)",
                          yaxis=dict(type="log", tickvals=GAP_TICKS, ticktext=[f"{t:g}" for t in GAP_TICKS]))
    else:
        if fp_top1 is not None:
            fig.add_hline(y=fp_top1, line_dash="dash", line_color="gray", annotation_text=f"FP {fp_top1:.2f}%")
        fig.update_layout(title="Top-1 per bit width", yaxis_title="top-1 (%)")
    fig.update_layout(xaxis_title="bits (W = A)", xaxis=dict(dtick=1), height=380,
                      margin=dict(l=10, r=10, t=40, b=10), legend=LEGEND)
    return fig


def paired_figure(pairs, reference: str) -> go.Figure:
    """Per-seed paired differences to the reference (one point per seed, a bar at their mean), one row per
    method and bit widths: points right of zero are seeds where the method scored higher.

    ``pairs``: a DataFrame with columns W, A, method, seed, difference (``logic.comparison``)."""
    fig = go.Figure()
    rows = [(m, w, a) for (w, a, m) in pairs[["W", "A", "method"]].drop_duplicates().itertuples(index=False)]
    names = [f"{m} W{w}A{a}" for m, w, a in rows]
    for i, ((m, w, a), name) in enumerate(zip(rows, names)):
        part = pairs[(pairs["method"] == m) & (pairs["W"] == w) & (pairs["A"] == a)]
        colour = SAFE[i % len(SAFE)]
        fig.add_trace(go.Scatter(x=part["difference"], y=[name] * len(part), mode="markers", name=name,
                                 marker=dict(size=11, color=colour, line=dict(color="#333", width=1)),
                                 customdata=part["seed"], showlegend=False,
                                 hovertemplate="seed %{customdata}: %{x:+.2f} points<extra>" + name + "</extra>"))
        fig.add_trace(go.Scatter(x=[part["difference"].mean()], y=[name], mode="markers", showlegend=False,
                                 marker=dict(symbol="line-ns", size=26, color=colour, line=dict(color=colour, width=3)),
                                 hovertemplate="mean %{x:+.2f} points<extra>" + name + "</extra>"))
    fig.add_vline(x=0, line_dash="dash", line_color="gray")
    fig.update_layout(title=f"Per seed: top-1 minus the reference's ({reference})", xaxis_title="difference (points)",
                      height=120 + 50 * max(1, len(rows)), margin=dict(l=10, r=10, t=40, b=10))
    return fig

# --------------------------------------------------------------------------- the Home picture


def method_picture(seed: int = 0) -> go.Figure:
    """A sketch of the idea: plain samples cluster at class centres; superposed ones fill the gap.

    Drawn from a toy 2-D model (two Gaussian classes, mixing their centres), not from a run.
    """
    rng = np.random.default_rng(seed)
    a, b = np.array([-2.0, 0.0]), np.array([2.0, 0.0])
    real = np.concatenate([rng.normal(a, 0.9, (120, 2)), rng.normal(b, 0.9, (120, 2))])
    plain = np.concatenate([rng.normal(a, 0.25, (25, 2)), rng.normal(b, 0.25, (25, 2))])
    lam = rng.uniform(0, 1, 40)[:, None]
    mixed = lam * a + (1 - lam) * b + rng.normal(0, 0.25, (40, 2))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=real[:, 0], y=real[:, 1], mode="markers", name="real data (unseen)",
                             marker=dict(color="#BBBBBB", size=5)))
    fig.add_trace(go.Scatter(x=plain[:, 0], y=plain[:, 1], mode="markers", name="plain synthetic (GDFQ)",
                             marker=dict(color=SAFE[1], symbol="square", size=7)))
    fig.add_trace(go.Scatter(x=mixed[:, 0], y=mixed[:, 1], mode="markers", name="superposed synthetic (Qimera)",
                             marker=dict(color=SAFE[4], symbol="x", size=8)))
    fig.add_vline(x=0.0, line_dash="dash", annotation_text="decision boundary")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=10, b=10), xaxis_visible=False, yaxis_visible=False,
                      legend=dict(orientation="h"))
    return fig
