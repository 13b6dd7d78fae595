"""Boundary samples: mix class embeddings and see what the teacher and the student make of the images."""
import numpy as np
import pandas as pd
import streamlit as st

from qimera_engine.ui import common, figures, paths
from qimera_engine.analysis import normalise_coefficients
from qimera_engine.ui.logic import (boundary_sentence, coefficient_formula, first_clean_seed, generator_runs,
                                    seed_sentence)

common.setup_page("Boundary samples", "🧬")
st.title("Boundary samples")
st.markdown("Qimera's generator takes a **mix** of class embeddings. Pick classes and coefficients: near "
            "equal weights, the teacher hesitates between the classes: that is a sample near its decision "
            "boundary, the kind plain generators rarely make.")

runs = common.all_runs()
gen_runs = sorted(generator_runs(runs), key=lambda r: r.config.method == "gdfq")  # Qimera runs first
if not gen_runs:
    common.need_runs_message("run with a generator")
    st.stop()

run = common.pick_run("Run (generator)", gen_runs, key="b_run", help="Any run with a saved generator.")
path, stamp = str(run.path), common.stamp(run)
note = common.networks_note(run)
if note:
    st.info(note)
    st.stop()
try:
    teacher, gen, student = common.run_networks(run)
    names = common.class_names(path, stamp)
except Exception as e:  # a damaged run folder: say so, keep the page
    st.error(f"Cannot load run {run.id}: {e}")
    st.stop()
if not paths.data_allowed(run.config.test_data):
    st.caption(f"Classes are numbered, not named: {common.OUTSIDE_DATA}")
mixable = gen.input_mode != "gdfq"
if not mixable:
    st.warning("This is a GDFQ run: its generator takes one class per image, so there is nothing to mix. "
               "Pick a Qimera run to mix classes; this one shows plain samples.")

# controls on the left, the images they make on the right: both in the first screen (1280 x 720)
controls, results = st.columns([2, 3])
with controls:
    n_classes = st.radio("Classes to mix", [2, 3], horizontal=True, key="b_k", disabled=not mixable) if mixable else 1
    cols = st.columns(max(n_classes, 2))
    letters = "ABC"
    chosen = [cols[i].selectbox(f"Class {letters[i]}", range(len(names)), index=i % len(names),
                                format_func=lambda c: f"{c}: {names[c]}", key=f"b_class_{i}") for i in range(n_classes)]
    if n_classes == 2:
        lam_b = st.slider("Coefficient of class B (λ_B)", 0.0, 1.0, 0.5, 0.01, key="b_coeff_b",
                          help="λ_A = 1 - λ_B. 0 gives a plain image of class A, 1 one of class B.")
        coeffs = [1 - lam_b, lam_b]
    elif n_classes == 3:
        raw = [cols[i].slider(f"Coefficient of class {letters[i]}", 0.0, 1.0, 1 / 3, 0.01, key=f"b_coeff_{i}",
                              help="Weights are rescaled to sum to 1.") for i in range(3)]
        coeffs = list(normalise_coefficients(raw))
    else:
        coeffs = [1.0]
    st.latex(coefficient_formula(coeffs, [names[c] for c in chosen], mapping=gen.config()["dm"]))
    c1, c2 = st.columns(2)
    n_seeds = c1.slider("Images (seeds)", 4, 32, 8, 4, key="b_seeds", help="One image per noise seed.")
    first = c2.number_input("First seed", 0, 10**6, 0, key="b_first_seed")
seeds = tuple(range(int(first), int(first) + n_seeds))
out = common.mixed_samples(path, stamp, tuple(chosen), tuple(round(float(c), 2) for c in coeffs), seeds)
table = pd.DataFrame({"seed": seeds, "teacher says": [names[i] for i in out["teacher_pred"]],
                      "teacher p": out["teacher_probs"].max(1).round(3),
                      "student says": [names[i] for i in out["student_pred"]],
                      "agree": out["teacher_pred"] == out["student_pred"]})
margin = np.sort(out["teacher_probs"], 1)
with results:
    st.image(out["grid"], width="stretch", caption="Generated images, one per seed (four per row)")
    st.caption(f"Teacher and student agree on {table['agree'].mean():.0%}; mean top-2 margin of the teacher "
               f"{(margin[:, -1] - margin[:, -2]).mean():.2f} (0: on the boundary).")
    st.caption("Generated images are not photographs: the generator only learns images that the teacher "
               "classifies as asked and whose BatchNorm statistics match the teacher's, so they show the colours "
               "and textures the teacher relies on, rarely a recognisable object.")
    st.caption(seed_sentence(out["spread"], out["layout"]))

left, right = st.columns([2, 3])
with left:
    st.dataframe(table, hide_index=True, key="b_table")
with right:
    st.plotly_chart(figures.probability_figure(out["teacher_probs"], names, [f"seed {s}" for s in seeds]),
                    key="b_probs")

st.header("From class A to class B")
a, b = chosen[0], chosen[1] if len(chosen) > 1 else (chosen[0] + 1) % len(names)
if not mixable:
    b = st.selectbox("Class B", range(len(names)), index=b, format_func=lambda c: f"{c}: {names[c]}", key="b_path_b")
c1, c2 = st.columns(2)
steps = c1.slider("Steps along the path", 3, 21, 7, 2, key="b_steps",  # 7: each image >= 96 px at 1280 px wide
                  help="Each step's image sits above its point on the chart; fewer steps, larger images.")
# the default path seed: the first from the images' first seed whose path starts on A and ends on B (with
# some seeds the teacher reads a third class even at an end, and the path then says little about A and B)
clean = first_clean_seed(lambda s: common.mixing_path(path, stamp, a, b, steps, s), a, b, int(first))
path_seed = c2.number_input("Path seed", 0, 10**6, int(first) if clean is None else clean,
                            key=f"b_path_seed_{run.id}_{a}_{b}_{int(first)}",
                            help="The default is the first seed, from the first seed above, on whose path the "
                                 "teacher reads class A at λ_B = 0 and class B at λ_B = 1.")
if clean is None:
    st.caption(f"With none of seeds {int(first)}-{int(first) + 7} does the teacher read {names[a]} at one end of the "
               f"path and {names[b]} at the other: this generator's {names[a]}-to-{names[b]} paths pass through "
               "other classes.")
elif clean != int(first):
    st.caption(f"Path seed {clean}: the first seed from {int(first)} whose path runs from {names[a]} to {names[b]} "
               "in the teacher's eyes.")
partner = common.pick_partner(run, runs, key="b") if mixable else None
kind = (" (GDFQ: input interpolation)" if not mixable
        else " (Qimera: superposed embeddings)" if run.config.generator_superposes
        else " (Qimera: superposed embeddings; the generator trained on plain batches, only its student saw mixes)"
        if run.config.superposes
        else " (Qimera: superposed embeddings; trained on plain batches only, so these mixes are new to it)")
panels = [("This run" + kind, run)]
if partner is not None:
    panels.append((f"GDFQ run {partner.id} (no superposition: input interpolation)", partner))
for title, r in panels:  # one above the other: full width, so each step's image stays large
    st.subheader(title)
    try:
        strip = common.mixing_path(str(r.path), common.stamp(r), a, b, steps, int(path_seed))
    except (ValueError, RuntimeError) as e:
        st.warning(f"No path for this run: {e}")
        continue
    st.plotly_chart(figures.path_figure(strip, names[a], names[b], names, strip["tiles"]), key=f"b_path_{r.id}")
    st.caption(boundary_sentence(strip, names, a, b))
st.caption("Orange bands: steps where the quantized student disagrees with the FP teacher.")
