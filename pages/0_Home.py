"""Home: what data-free quantization and Qimera are, and the demo (the app's first page, see app.py)."""
import streamlit as st

# The title and the introduction need no engine: they go out first and show while the first page of a
# new server imports torch (about 2 s on a 2-core CPU).
st.title("Qimera Explorer")
st.markdown(
    "**Data-free quantization** turns a full-precision (FP) classifier into a low-bit one (e.g. 4-bit weights "
    "and activations) *without any of its training data*: a generator learns to make images that the FP "
    "*teacher* finds typical (matching its BatchNorm statistics), and the quantized *student* is fine-tuned to "
    "copy the teacher on them.\n\n"
    "**Qimera** (NeurIPS 2021) notices that such images gather at the class centres, far from the decision "
    "boundaries where the student most needs guidance. It *superposes* class embeddings, "
    "z = λ·e_A + (1-λ)·e_B, so the generator also makes **boundary supporting samples** between classes.")

from qimera_engine import preset, runs_dir  # noqa: E402  (after the title, see above)
from qimera_engine.ui import common, figures, paths  # noqa: E402
from qimera_engine.ui.logic import (diversity_line, run_curves_line, seed_sentence,  # noqa: E402
                                    showcase_pair)

common.setup_page("Home", "🧪")
st.header("Run the demo")
st.markdown("Quantizes a small CNN on 8×8 digits to W4A4 with Qimera, end to end: the teacher is trained on "
            "the spot the first time (seconds), then generator and student train for 12 short epochs.")
c1, c2 = st.columns(2)
if c1.button("Run the demo", type="primary", key="run-demo",
             help="Starts the digits preset in the background; you can switch pages while it runs."):
    common.registry().start_run(preset("digits"), label="demo: digits W4A4 (Qimera)")
if c2.button("Qimera vs GDFQ at W4A4", key="run-pair",
             help="Two digits runs with the same teacher, bit widths, budget and seed, one per method (about a "
                  "minute on 2 CPU cores): the fair pair that Boundary samples, Feature space and Bit widths compare."):
    common.registry().start_sweep(preset("digits"), [4], ["qimera", "gdfq"], [0],
                                  label="comparison: Qimera vs GDFQ at W4A4 (digits)", on_ray=False)
common.jobs_section("run", key="home", limit=1, label_prefix="demo:")  # the demo, not any newer run
common.jobs_section("sweep", key="home-pair", limit=1, curves=False, label_prefix="comparison: Qimera vs GDFQ")
demo = next((j for j in common.registry().jobs("run") if j.label.startswith("demo:")), None)
if demo is not None and demo.status == "finished":
    st.success("The demo run is done. Next: see what its generator makes, and how the student compares.")
    c1, c2, c3 = st.columns(3)
    with c1:
        st.page_link("pages/3_Boundary_samples.py", label="Mix two classes: boundary samples", icon="🧬")
    with c2:
        st.page_link("pages/4_Feature_space.py", label="Real vs synthetic features", icon="🗺️")
    with c3:
        st.page_link("pages/2_Quantize.py", label="Its curves, and a GDFQ run to compare", icon="⚙️")

all_shipped = paths.shipped_runs()
shipped = [r for r in all_shipped if r.config.method == "qimera"]
if shipped:
    st.header("CIFAR-10, ready to look at")
    show, other = showcase_pair(shipped)  # the generator whose superposed samples are most varied
    names = common.class_names(str(show.path), common.stamp(show))
    a, b = names.index("cat") if "cat" in names else 0, names.index("dog") if "dog" in names else 1
    out = common.mixed_samples(str(show.path), common.stamp(show), (a, b), (0.5, 0.5), tuple(range(8)))
    left, right = st.columns([2, 1])  # tiles >= 128 px at 1280 px wide
    trained = ("trained on superposed batches" if show.config.generator_superposes
               else "trained on plain batches only; its student saw superposed ones" if show.config.superposes
               else "trained on plain batches only: the classes are mixed here, at sampling")
    left.image(out["grid"], width="stretch",
               caption=f"Half {names[a]}, half {names[b]}: superposed samples of the shipped Qimera "
                       f"run ({common.run_label(show)}; {trained}), eight noise seeds. "
                       + seed_sentence(out["spread"], out["layout"]))
    real = common.real_class_images(show, (a, b), 4, ncols=4)  # as large as the generated ones
    if real is not None:  # what the teacher was trained on, for comparison (the generator never sees them)
        left.image(real, width="stretch", caption=f"Real CIFAR-10 test images: four {names[a]}s, four {names[b]}s. "
                                                  "Neither the generator nor the student ever sees real images.")
    with right:
        s = show.summary or {}
        st.markdown(f"ResNet-20 on CIFAR-10 quantized to W{show.config.wbits}A{show.config.abits} without its "
                    f"training data: FP {s.get('fp_top1', 0):.2f}% → {s.get('quant_top1', 0):.2f}% top-1 on 5,000 "
                    f"CIFAR-10 test images. The teacher reads these images as: "
                    + ", ".join(f"{names[p]}" for p in out["teacher_pred"]) + ".")
        if other is not None and (other.summary or {}).get("quant_top1") is not None:
            how = (f"**with** superposed batches (p = {other.config.superpose_p:g})" if other.config.superposes
                   else "**without** superposed batches")
            st.markdown(f"The same recipe trained {how} scores {other.summary['quant_top1']:.2f}%: one seed each, "
                        "too few to tell the two apart.")
        line = run_curves_line(all_shipped, show, paths.curves_file())
        if line:
            st.markdown(line)
        line = diversity_line(s)
        if line:
            st.markdown(line)
        st.caption("Shipped with the app (read-only), so there is something to see before any run of your own.")
        st.page_link("pages/3_Boundary_samples.py", label="Mix classes yourself", icon="🧬")
        st.page_link("pages/4_Feature_space.py", label="Real vs synthetic features", icon="🗺️")

st.plotly_chart(figures.method_picture(), key="method-picture")
st.caption("A sketch with toy 2-D data, not a run: plain synthetic samples sit at the class centres; "
           "superposed ones fill the space between the classes and cross the decision boundary.")

c1, c2 = st.columns(2)
c1.metric("Device in use", "GPU" if common.device_description().startswith("GPU") else "CPU")
c1.caption(common.device_description())
c2.markdown(f"**Runs are stored in** `{runs_dir()}`  \nSet the environment variable `QIMERA_HOME` to change it.")

st.header("Explore")
st.page_link("pages/1_Teacher.py", label="Teacher: choose the data set and the FP model", icon="🎓")
st.page_link("pages/2_Quantize.py", label="Quantize: every setting, live progress, the list of runs", icon="⚙️")
st.page_link("pages/3_Boundary_samples.py", label="Boundary samples: mix classes and see what the teacher sees",
             icon="🧬")
st.page_link("pages/4_Feature_space.py", label="Feature space: real vs synthetic features in 2-D", icon="🗺️")
st.page_link("pages/5_Bit_widths.py", label="Bit widths: accuracy from 2 to 8 bits, per method", icon="📉")

common.warm_umap()  # while Home is read, so that Feature space's first UMAP does not wait for its compiling
