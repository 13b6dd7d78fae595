"""Feature space: where the teacher puts real images and synthetic ones (the paper's Figure 3, live)."""
import pandas as pd
import streamlit as st

from qimera_engine.analysis import BOUNDARY_THRESHOLD
from qimera_engine.ui import common, figures, paths
from qimera_engine.ui.logic import (FEATURE_NUMBERS, dominant_class, feature_table, feature_verdict,
                                    generator_runs, hover_coefficients, selected_points)
from qimera_engine.ui.tasks import features_key, features_task

QUICK_SECONDS = 1.5  # how long the page waits for a projection before it shows progress instead

common.setup_page("Feature space", "🗺️")
st.title("Feature space")
st.markdown("The teacher's penultimate features of **real** test images and of **synthetic** ones (plain, "
            "superposed, and GDFQ's when a GDFQ run exists), projected to 2-D. The projection is fitted on the "
            "real features only; synthetic ones are placed into it.")

runs = common.all_runs()
gen_runs = [r for r in generator_runs(runs) if r.config.method != "gdfq"] or generator_runs(runs)
if not gen_runs:
    common.need_runs_message("run with a generator")
    st.stop()

run = common.pick_run("Run (generator)", gen_runs, key="f_run")
note = common.networks_note(run)
if note or not paths.data_allowed(run.config.test_data):
    # the projection is fitted on the run's real test images: without them there is nothing to place
    st.info(note or f"Run {run.id}: {common.OUTSIDE_DATA} Feature space fits its projection on those real "
                    "images, so it shows nothing for this run; pick another.")
    st.stop()
partner = common.pick_partner(run, runs, key="f") if run.config.method != "gdfq" else None
c1, c2, c3 = st.columns(3)
method = c1.segmented_control("Projection", ["pca", "umap"], default="pca", key="f_method",
                              format_func=str.upper, help="PCA is exact and instant; UMAP shows neighbourhoods "
                              "better but distorts distances and takes longer (it runs in the background).") or "pca"
n = c2.select_slider("Samples per source", [200, 500, 1000, 2000], 200, key="f_n",
                     help="More samples: steadier numbers, a slower projection (about 1 s per 250 synthetic "
                     "CIFAR-10 images on 2 CPU cores).")
seed = int(c3.number_input("Seed", 0, 10**6, 0, key="f_seed"))
gdfq_path = str(partner.path) if partner is not None else None
key = features_key(run, partner if gdfq_path else None, n, seed, method)
job = common.registry().find(key)
if job is None or job.status in ("failed", "cancelled"):
    if method == "pca" or st.button("Compute the UMAP projection", type="primary", key="f_go"):
        job_id = common.registry().start_task(features_task(str(run.path), gdfq_path, n, seed, method),
                                              label=f"{method.upper()} of {run.id} ({n} per source)", key=key)
        # a quick answer (samples already computed, code compiled) is shown in this run, without polling
        job = common.registry().wait(job_id, timeout=QUICK_SECONDS)
    elif job is not None:
        st.error(f"The last try failed: {job.error}")


@st.fragment(run_every=common.POLL_SECONDS if job is not None and job.active else None)
def progress():
    j = common.registry().find(key)
    if j is not None and j.active:
        common.job_panel(j, curves=False, key="features")
    elif job is not None and job.active:
        st.rerun()


progress()
job = common.registry().find(key)
if job is not None and job.status == "finished" and job.result:
    st.session_state["f_last_key"] = key
    result = job.result
    common.warm_umap()  # opened here directly: compile UMAP's code while the user looks at the PCA
else:
    if job is not None and job.status == "failed":
        st.error(f"Could not compute the features: {job.error}")
    last = common.registry().find(st.session_state.get("f_last_key", ""))
    if last is None or not last.result:
        st.stop()
    # the chart does not vanish while a new one computes, nor before the UMAP button is pressed
    st.info("Showing the previous projection until the new one is ready." if job is not None and job.active
            else "Showing the previous projection (its title says which) until you compute this one.")
    result = last.result
sources, classes = result["sources"], result["classes"]
left, right = st.columns([2, 1])  # wide enough for the table of numbers
with right:
    st.markdown("**Near the decision boundary**")
    threshold = st.slider("Margin threshold", 0.0, 1.0, BOUNDARY_THRESHOLD, 0.01, key="f_threshold",
                          help="A sample counts as near the boundary when the teacher's top-1 minus top-2 "
                          "probability is below this.")
    k = int(st.number_input("Neighbours k (coverage)", 1, 50, 5, key="f_k",
                            help="Coverage: share of real samples whose k-NN ball holds a synthetic sample."))
    rows = feature_table(sources, threshold, k)
    st.dataframe(pd.DataFrame(rows).style.format({"near boundary": "{:.1%}", "coverage": "{:.1%}",
                                                  "spread": "{:.2f}x"}, na_rep="-"),
                 hide_index=True, key="f_numbers")
    st.caption(FEATURE_NUMBERS)
    for line in feature_verdict({r["source"]: {"near": r["near boundary"], "coverage": r["coverage"]} for r in rows}):
        (st.success if line.startswith("As expected") else st.warning)(line)
with left:
    coords = {name: s["xy"] for name, s in sources.items()}
    labels = {name: dominant_class(s["labels"], s["coeffs"]) for name, s in sources.items()}
    hover = {name: hover_coefficients(s["labels"], s["coeffs"], classes) for name, s in sources.items()}
    picked = st.plotly_chart(figures.feature_scatter(coords, labels, classes, hover, title=f"{result['method'].upper()} "
                                                     f"of the teacher's features (seed {result.get('seed', seed)}, "
                                                     f"{result.get('n', n)} per source)"), key="f_scatter",
                             on_select="rerun", selection_mode=("points", "box", "lasso"))
points = picked.selection.points if picked and picked.selection else []
if points:
    st.subheader(f"Selected points ({len(points)})")
    chosen = selected_points(points, sources, classes)
    if len(chosen):
        picks = list(zip(chosen["source"], chosen["index"]))
        try:
            grid = common.point_images(run, partner if gdfq_path else None, sources, picks, int(result.get("seed", seed)))
            st.image(grid, caption="The images behind the points, in the table's order"
                     + (f" (the first {common.MAX_POINT_IMAGES})" if len(picks) > common.MAX_POINT_IMAGES else "")
                     + ": real ones from the test set, synthetic ones made again from their classes, "
                       "coefficients and noise seed.")
        except (OSError, ValueError, paths.PathNotAllowed) as e:
            st.warning(f"Could not show their images: {e}")
    st.dataframe(chosen, hide_index=True, key="f_selected")
else:
    st.caption("Click a point (or draw a box or lasso around several) to see its image, with the teacher's "
               "top-3 classes.")
st.caption("Colour: class (for superposed samples, the class with the largest coefficient). Marker: source. "
           "What to look for: plain samples sit in tight clusters at the class centres; superposed ones spread "
           "into the space between clusters, where the real data also lives. UMAP distances between clusters "
           "carry little meaning; compare with PCA.")
