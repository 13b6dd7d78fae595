"""Guided tour: the method in seven screens, on the shipped CIFAR-10 runs (or a run of one's own), for a class demo.

Each step fits one 1280 x 720 screen: its images are laid out so that a tile is at least 128 px wide there."""
import streamlit as st

from qimera_engine.ui import common, figures, paths
from qimera_engine.ui.logic import (TOUR_STEPS, comparison, comparison_display, diversity_line,
                                    first_clean_seed, generator_runs, labelled_runs, run_curves_line,
                                    seed_sentence, showcase_pair)

common.setup_page("Guided tour", "🧭")

shipped = [r for r in paths.shipped_runs() if r.config.method == "qimera"]
if shipped:
    run, other = showcase_pair(shipped)
    everything = paths.shipped_runs()
else:  # no showcase: the newest Qimera run of one's own
    own = [r for r in generator_runs(common.all_runs()) if r.config.method == "qimera"]
    if not own:
        st.title("Guided tour")
        common.need_runs_message("Qimera run")
        st.stop()
    run, other, everything = own[0], None, own
path, stamp = str(run.path), common.stamp(run)
note = common.networks_note(run)
if note:
    st.title("Guided tour")
    st.info(note)
    st.stop()
names = common.class_names(path, stamp)
a = names.index("cat") if "cat" in names else 0
b = names.index("dog") if "dog" in names else 1
summary = run.summary or {}
classes = tuple(range(min(10, len(names))))

step = min(int(st.session_state.get("tour_step", 0)), len(TOUR_STEPS) - 1)
head, back, forward = st.columns([6, 1, 1], vertical_alignment="bottom")
head.header(f"{step + 1}. {TOUR_STEPS[step]}")
if back.button("Back", key="tour_back", disabled=step == 0, width="stretch"):
    st.session_state["tour_step"] = step - 1
    st.rerun()
if forward.button("Next", key="tour_next", type="primary", disabled=step == len(TOUR_STEPS) - 1, width="stretch"):
    st.session_state["tour_step"] = step + 1
    st.rerun()
st.progress((step + 1) / len(TOUR_STEPS), text=f"Step {step + 1} of {len(TOUR_STEPS)} · run {common.run_label(run)}")

if step == 0:  # the teacher
    text, number = st.columns([3, 1])
    text.markdown(f"The **teacher** is a trained classifier ({run.config.teacher}) in full precision. We want a "
                  f"**W{run.config.wbits}A{run.config.abits}** copy of it (4-bit weights and activations: about 8x "
                  "smaller, fast on integer hardware), and **may not use any of its training data**. Rounding every "
                  "weight to 16 levels breaks the network; fine-tuning it needs images.")
    number.metric("Teacher's top-1", f"{summary.get('fp_top1', 0):.2f}%")
    grid = common.real_class_images(run, classes, 1, ncols=5)
    if grid is not None:
        st.image(grid, width="stretch", caption="Real test images, one per class: " + ", ".join(names[c] for c in classes) + ".")
elif step == 1:  # what a generator makes
    st.markdown("A **generator** learns to make images the teacher finds typical: the teacher classifies each as "
                "the class asked for, and the statistics its BatchNorm layers saw in training (a mean and a variance "
                "per channel) come out the same. The 4-bit **student** then learns to copy the teacher on them.")
    out = common.class_samples(path, stamp, classes, 0, 5)
    st.image(out["grid"], width="stretch", caption="Generated, one per class (not photographs: the colours and "
             "textures the teacher relies on). The teacher reads them as: " + ", ".join(names[p] for p in out["teacher_pred"]) + ".")
elif step == 2:  # real vs synthetic
    seeds = common.mixed_samples(path, stamp, (a,), (1.0,), tuple(range(8)))
    st.markdown((diversity_line(summary) or "This run did not measure how varied its samples are.") + " "
                + seed_sentence(seeds["spread"], seeds["layout"]))
    left, right = st.columns(2)
    real = common.real_class_images(run, (a, b), 3, ncols=3)
    if real is not None:
        left.image(real, width="stretch", caption=f"Real: three {names[a]}s, three {names[b]}s (never seen by the "
                                                  "generator or the student).")
    made = common.class_samples(path, stamp, (a, a, a, b, b, b), 0, 3)
    right.image(made["grid"], width="stretch", caption=f"Generated: three {names[a]}s, three {names[b]}s "
                                                       "(three noise seeds each).")
elif step == 3:  # mixing two classes
    left, right = st.columns([2, 1])
    with right:
        lam = st.slider(f"How much {names[b]} (λ)", 0.0, 1.0, 0.5, 0.05, key="tour_lambda")
        st.markdown(f"Qimera feeds the generator a **mix of class embeddings**: z = (1-λ)·e_{names[a]} + "
                    f"λ·e_{names[b]}. Near λ = 0.5 the images sit **between** the classes, near the teacher's "
                    "decision boundary, where a student that copies only class centres makes its mistakes.")
    out = common.mixed_samples(path, stamp, (a, b), (round(1 - lam, 2), round(lam, 2)), tuple(range(8)))
    left.image(out["grid"], width="stretch", caption=f"{1 - lam:.0%} {names[a]}, {lam:.0%} {names[b]}, eight seeds. "
               "The teacher reads them as: " + ", ".join(names[p] for p in out["teacher_pred"]) + ".")
elif step == 4:  # where the teacher changes its mind
    steps = 5  # five images across the screen: each about 150 px wide at 1280
    seed = first_clean_seed(lambda s: common.mixing_path(path, stamp, a, b, steps, s), a, b, 0)
    strip = common.mixing_path(path, stamp, a, b, steps, 0 if seed is None else seed)
    st.caption(f"From {names[a]} (left) to {names[b]} (right): the teacher's probability of each class along the "
               "way, the image of each step above it. Orange: steps where the 4-bit student disagrees with the teacher.")
    st.plotly_chart(figures.path_figure(strip, names[a], names[b], names, strip["tiles"], height=440,
                                        image_share=0.42), key="tour_path")
elif step == 5:  # what the student learns
    left, right = st.columns([3, 2])
    if run.metrics:
        left.plotly_chart(figures.accuracy_figure(run.metrics, summary.get("fp_top1")), key="tour_accuracy")
    right.metric(f"The W{run.config.wbits}A{run.config.abits} student's top-1", f"{summary.get('quant_top1', 0):.2f}%",
                 f"{summary.get('quant_top1', 0) - summary.get('fp_top1', 0):+.2f} points against the teacher")
    right.markdown("Each epoch the generator makes fresh images (plain and, with Qimera, mixed), the teacher "
                   "labels them with its probabilities, and the student learns to give the same ones. It never sees "
                   "a real image; the test images only measure it.")
else:  # the numbers
    done = [r for r in everything if r.config.teacher == run.config.teacher and r.summary]
    labelled = labelled_runs(done)  # as the table names them
    table, _ = comparison(done, next((lab for r, lab in labelled if r.id == run.id), labelled[0][1]))
    if len(table):
        st.dataframe(comparison_display(table), hide_index=True, key="tour_table")
    line = run_curves_line(everything, run, paths.curves_file()) if shipped else None  # (the shipped teacher's)
    st.markdown("**Does superposition help?** One seed each cannot say: two runs of one method differ by about "
                "0.2-0.4 points from their seed alone. "
                + (line + " " if line else "(docs/results.md compares them over three seeds.) ")
                + "Start a comparison of your own over several seeds:")
    st.page_link("pages/6_Compare.py", label="Compare methods over seeds", icon="⚖️")
    st.page_link("pages/3_Boundary_samples.py", label="Mix classes yourself", icon="🧬")
