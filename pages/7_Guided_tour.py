"""Guided tour: the method in seven screens, on the shipped CIFAR-10 runs (or a run of one's own), for a class demo."""
import streamlit as st

from qimera_engine.ui import common, figures, paths
from qimera_engine.ui.logic import (comparison, distinct_labels, diversity_line, first_clean_seed, generator_runs, seed_sentence,
                                    showcase_pair, TOUR_STEPS)

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

step = min(int(st.session_state.get("tour_step", 0)), len(TOUR_STEPS) - 1)
head, back, forward = st.columns([6, 1, 1], vertical_alignment="bottom")
head.title(f"{step + 1}. {TOUR_STEPS[step]}")
if back.button("Back", key="tour_back", disabled=step == 0, width="stretch"):
    st.session_state["tour_step"] = step - 1
    st.rerun()
if forward.button("Next", key="tour_next", type="primary", disabled=step == len(TOUR_STEPS) - 1, width="stretch"):
    st.session_state["tour_step"] = step + 1
    st.rerun()
st.progress((step + 1) / len(TOUR_STEPS), text=f"Step {step + 1} of {len(TOUR_STEPS)} · run {common.run_label(run)}")

if step == 0:  # the teacher
    left, right = st.columns([3, 2])
    grid = common.real_class_images(run, tuple(range(min(10, len(names)))), 1, ncols=5)
    if grid is not None:
        left.image(grid, width="stretch", caption="Real test images, one per class: "
                   + ", ".join(names[:10]) + ".")
    right.metric("The teacher's top-1 (full precision)", f"{summary.get('fp_top1', 0):.2f}%")
    right.markdown(f"The **teacher** is a trained classifier ({run.config.teacher}) in full precision. We want "
                   f"a **W{run.config.wbits}A{run.config.abits}** copy of it, with 4-bit weights and activations: "
                   "about 8x smaller, and fast on integer hardware.\n\n"
                   "The catch: **we may not use any of its training data.** Rounding every weight to 16 levels "
                   "breaks the network, and fine-tuning it needs images.")
elif step == 1:  # what a generator makes
    left, right = st.columns([3, 2])
    out = common.class_samples(path, stamp, tuple(range(min(10, len(names)))), 0, 5)
    left.image(out["grid"], width="stretch", caption="Generated images, one per class. The teacher reads them as: "
               + ", ".join(names[p] for p in out["teacher_pred"]) + ".")
    right.markdown("A **generator** learns to make images that the teacher finds typical:\n"
                   "- the teacher classifies each one as the class asked for, and\n"
                   "- the statistics that the teacher's BatchNorm layers saw in training (a mean and a variance "
                   "per channel) come out the same.\n\n"
                   "They are not photographs: they carry the colours and textures the teacher relies on. "
                   "The 4-bit **student** is then fine-tuned to copy the teacher's answers on them.")
elif step == 2:  # real vs synthetic
    left, right = st.columns(2)
    real = common.real_class_images(run, (a, b), 4, ncols=4)
    if real is not None:
        left.image(real, width="stretch", caption=f"Real: four {names[a]}s, four {names[b]}s (never seen by the "
                                                  "generator or the student).")
    mix_a = common.mixed_samples(path, stamp, (a,), (1.0,), tuple(range(4)))
    mix_b = common.mixed_samples(path, stamp, (b,), (1.0,), tuple(range(4)))
    right.image(common.stack_grids([mix_a["grid"], mix_b["grid"]]), width="stretch",
                caption=f"Generated: four {names[a]}s, four {names[b]}s (four noise seeds each). "
                        + seed_sentence(mix_a["spread"]))
    line = diversity_line(summary)
    st.markdown(line or "This run did not measure how varied its samples are.")
elif step == 3:  # mixing two classes
    left, right = st.columns([3, 2])
    with right:
        lam = st.slider(f"How much {names[b]} (λ)", 0.0, 1.0, 0.5, 0.05, key="tour_lambda")
        st.markdown(f"Qimera feeds the generator a **mix of class embeddings**: z = (1-λ)·e_{names[a]} + "
                    f"λ·e_{names[b]}. Near λ = 0.5 the images sit **between** the classes, near the teacher's "
                    "decision boundary: the region where a student that copies only class centres makes its "
                    "mistakes.")
    out = common.mixed_samples(path, stamp, (a, b), (round(1 - lam, 2), round(lam, 2)), tuple(range(8)))
    left.image(out["grid"], width="stretch", caption=f"{1 - lam:.0%} {names[a]}, {lam:.0%} {names[b]}, eight seeds. "
               "The teacher reads them as: " + ", ".join(names[p] for p in out["teacher_pred"]) + ".")
elif step == 4:  # where the teacher changes its mind
    steps = 7
    seed = first_clean_seed(lambda s: common.mixing_path(path, stamp, a, b, steps, s), a, b, 0)
    strip = common.mixing_path(path, stamp, a, b, steps, 0 if seed is None else seed)
    st.plotly_chart(figures.path_figure(strip, names[a], names[b], names, strip["tiles"]), key="tour_path")
    st.caption(f"From {names[a]} (left) to {names[b]} (right) in {steps} steps: the teacher's probability of each "
               "class along the way, with the image of each step above it. Orange: steps where the 4-bit student "
               "disagrees with the teacher.")
elif step == 5:  # what the student learns
    left, right = st.columns([3, 2])
    metrics = run.metrics
    if metrics:
        left.plotly_chart(figures.accuracy_figure(metrics, summary.get("fp_top1")), key="tour_accuracy")
    right.metric(f"The W{run.config.wbits}A{run.config.abits} student's top-1", f"{summary.get('quant_top1', 0):.2f}%",
                 f"{summary.get('quant_top1', 0) - summary.get('fp_top1', 0):+.2f} points against the teacher")
    right.markdown("Each epoch the generator makes fresh images (plain and, with Qimera, mixed), the teacher "
                   "labels them with its probabilities, and the student learns to give the same ones. It never sees "
                   "a real image; the test images only measure it.")
else:  # the numbers
    done = [r for r in everything if r.config.teacher == run.config.teacher and r.summary]
    labels = distinct_labels([r.config for r in done])  # as the table names them
    table, _ = comparison(done, next((lab for r, lab in zip(done, labels) if r.id == run.id), labels[0]))
    if len(table):
        st.dataframe(table[["W", "A", "method", "n", "top-1 mean", "pairs", "difference mean", "verdict"]],
                     hide_index=True, key="tour_table",
                     column_config={"top-1 mean": st.column_config.NumberColumn(format="%.2f"),
                                    "difference mean": st.column_config.NumberColumn(format="%+.2f")})
    st.markdown("**Does superposition help?** One seed each cannot say: two runs of one method differ by about "
                "0.2-0.4 points from their seed alone (docs/results.md compares them over three seeds). Start a "
                "comparison of your own over several seeds:")
    st.page_link("pages/6_Compare.py", label="Compare methods over seeds", icon="⚖️")
    st.page_link("pages/3_Boundary_samples.py", label="Mix classes yourself", icon="🧬")
