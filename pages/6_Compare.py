"""Compare: does a method (or superposition) help? Methods side by side over seeds, with paired differences."""
import streamlit as st

from qimera_engine import ConfigError, preset
from qimera_engine.ui import common, figures
from qimera_engine.ui.logic import (COMPARE_METHODS, bitwidth_table, comparison, comparison_defaults, comparison_display,
                                    labelled_runs, parse_variants, start_presets)

common.setup_page("Compare", "⚖️")
st.title("Compare methods")
st.markdown("Does superposition help? Does Qimera beat GDFQ? Start the methods side by side, on the same teacher, "
            "bit widths and budget, over several seeds. Each seed gives every method the same start, so the "
            "per-seed **paired differences** below say more than two averages: one test image is worth "
            "0.22 points on digits.")

st.header("Start a comparison")
presets = start_presets()
preset_name = st.selectbox("Preset", list(presets), index=list(presets).index(common.teacher_preset()),
                           format_func=lambda p: f"{p}: {presets[p]}", key="c_preset")
chosen_teacher = common.use_teacher_choice("c_use_teacher")  # the Teacher page's teacher (the shipped ResNet-20 too)
try:
    base = preset(preset_name, **chosen_teacher)
except (ConfigError, ValueError) as e:
    st.error(f"This preset cannot start with that teacher: {e}")
    st.stop()
defaults = comparison_defaults(preset_name)
with st.form("compare-form"):
    # the methods get the full width: their labels are long, and at 1280 px a narrower box hid the third
    methods = st.multiselect("Methods", list(COMPARE_METHODS), defaults["methods"], key=f"c_{preset_name}_methods",
                             help="Each with the preset's other settings. A variant of your own goes below.")
    c0, c1, c2, c3 = st.columns([2, 1, 1, 1])
    bits = c0.multiselect("Bit widths (W = A)", list(range(2, 9)), defaults["bits"], key=f"c_{preset_name}_bits")
    seeds = c1.number_input("Seeds", 1, 10, defaults["seeds"], key=f"c_{preset_name}_seeds",
                            help="At least 3: with one seed no difference can be told from noise.")
    epochs = c2.number_input("Epochs per run", 1, 1000, base.epochs, key=f"c_{preset_name}_epochs",
                             help="The same budget for every method.")
    iters = c3.number_input("Iterations per epoch", 1, 10000, base.iters_per_epoch, key=f"c_{preset_name}_iters")
    variants_text = st.text_area(
        "Variants of your own (optional)", key=f"c_{preset_name}_variants", height=80,
        placeholder="one per line, settings as on the command line, e.g.\n"
                    "mapping on: method=qimera, dm=true\nfixed 50/50: method=qimera, coeff_sampler=fixed, fixed_coeffs=0.5,0.5")
    go = st.form_submit_button("Start the comparison", type="primary")
    common.sweep_where_caption()
if go:
    try:
        chosen = {name: COMPARE_METHODS[name] for name in methods}
        chosen.update(parse_variants(variants_text))
        if not chosen or not bits:
            raise ValueError("choose at least one method and one bit width")
        schedule = {"epochs": int(epochs), "iters_per_epoch": int(iters)}
        if schedule != {"epochs": base.epochs, "iters_per_epoch": base.iters_per_epoch}:  # a shorter run keeps its phases in proportion
            warm = min(base.warmup_epochs, int(epochs) - 1)
            schedule.update(warmup_epochs=warm, calib_epochs=max(1, min(base.calib_epochs, warm)),
                            milestones=[m for m in base.milestones if m < int(epochs)])
        runs_base = base.with_overrides(**schedule)
        n = len(chosen) * len(bits) * int(seeds)
        common.registry().start_sweep(runs_base, sorted(bits), list(chosen.values()), range(int(seeds)),
                                      label=f"comparison: {', '.join(chosen)} at "
                                            f"{', '.join(f'W{b}A{b}' for b in sorted(bits))}, {int(seeds)} seed(s), "
                                            f"{n} runs ({runs_base.teacher})")
    except (ConfigError, ValueError) as e:
        st.error(f"Cannot start the comparison: {e}")
common.jobs_section("sweep", key="compare", limit=1, curves=False, label_prefix="comparison:")

st.header("Results")
runs = common.all_runs()
table = bitwidth_table(runs)
if table.empty:
    st.info("No finished runs yet: start a comparison above. Results appear here as its runs finish.")
    st.stop()
ids = set(common.pick_teacher_and_budget(table, "c", "Only runs of one budget are compared.", side_by_side=True,
                                             newest_budget=True)["run"])
subset = [r for r in runs if r.id in ids]
labels = sorted({label for _, label in labelled_runs(subset)})
reference = st.selectbox("Reference (differences are measured against it)", labels, key="c_reference",
                         index=next((i for i, lab in enumerate(labels) if lab.endswith("p=0")),
                                    next((i for i, lab in enumerate(labels) if lab.startswith("gdfq")), 0)))
summary, pairs = comparison(subset, reference)
# a static table: its cells wrap, so the mean ± std and the verdict are read whole at 1280 px (a dataframe cuts them)
st.table(comparison_display(summary).set_index("method"))
st.caption("top-1: the final epoch's, mean ± std over n runs. Difference: per seed, the method's top-1 minus the "
           "reference's at the same bit widths (same seed, same start); wins and losses count seeds. The verdict "
           "comes from a 95 % paired t interval: 'cannot tell apart' means the seeds disagree more than the methods do.")
if not pairs.empty:
    st.plotly_chart(figures.paired_figure(pairs, reference), key="c_pairs")
st.download_button("Download CSV", summary.to_csv(index=False).encode(), "comparison.csv", "text/csv", key="c_csv")
