"""Bit widths: top-1 from 2 to 8 bits for each method, from finished runs and sweeps started here."""
import streamlit as st

from qimera_engine import METHODS, ConfigError, preset
from qimera_engine.ui import common, figures, paths
from qimera_engine.ui.logic import bitwidth_table, from_other_budget, start_presets

common.setup_page("Bit widths", "📉")
st.title("Bit widths")
st.markdown("How accuracy falls as weights and activations get fewer bits (W = A), per method: every finished "
            "run counts, and a sweep started below adds to it.")

runs = common.all_runs()
table = bitwidth_table(runs, paths.curves_file())
if table.empty:
    st.info("No finished runs with W = A between 2 and 8 yet: start a sweep below (or runs on the Quantize page).")
else:
    part = common.pick_teacher_and_budget(table, "w", "Runs of different budgets are never averaged together. PTQ, "
                                          "which calibrates and never fine-tunes, is shown at every budget.",
                                          baselines=True)
    c1, c2 = st.columns(2)
    value = c1.radio("Accuracy", ["top1", "best_top1"], horizontal=True, key="w_value",
                     format_func={"top1": "final epoch", "best_top1": "best epoch (the paper's choice)"}.get)
    gap = c2.radio("Show", [False, True], horizontal=True, key="w_gap",
                   format_func={False: "top-1", True: "points below FP (log scale)"}.get,
                   help="On a log scale the gaps of 5 to 8 bits (tenths of a point) show as clearly as those of "
                        "2 bits (tens of points); on the top-1 scale they lie on top of each other.") is True
    baselines = {m for m in part["method"] if from_other_budget(m)}
    chart = figures.bitwidth_figure(part, part["fp_top1"].mean(), value, dotted=baselines, gap=gap)
    st.plotly_chart(chart, key="w_chart")
    st.dataframe(part, hide_index=True, key="w_table",
                 column_config={"method": st.column_config.TextColumn(width="medium")})  # labels are long
    notes = []
    floored = sum(int((t.customdata[:, 1] <= figures.GAP_FLOOR).sum()) for t in chart.data) if gap else 0
    if floored:  # (customdata[:, 1]: each point's mean gap, before the floor)
        notes.append(f"{floored} points are at or above their teacher's top-1 and are drawn at "
                     f"{figures.GAP_FLOOR:g} (a log scale has no zero).")
    if baselines:
        notes.append("PTQ calibrates its student on generated images and never fine-tunes it, so its rows (their own "
                     "budget in the label) stand beside every budget's as the baseline without fine-tuning.")
    precomputed = (~part["run"].isin({r.id for r in runs})).sum()  # the rows no run of the list gave
    if precomputed:
        notes.append(f"{precomputed} of these rows are precomputed: summaries of runs made for the showcase, shipped "
                     "without their networks (the project's docs/results.md gives their command, machine and date).")
    if notes:
        st.caption(" ".join(notes))
    st.download_button("Download CSV", part.to_csv(index=False).encode(), "bit_widths.csv", "text/csv",
                       key="w_csv")
    common.export_panel([r for r in runs if r.id in set(part["run"])], key="w")

st.header("Sweep")
with st.form("sweep-form"):
    presets = start_presets()
    c1, c2, c3 = st.columns(3)
    base_name = c1.selectbox("Preset", list(presets), index=list(presets).index(common.teacher_preset()),
                             key="w_preset", help="Teacher, data and paper settings.")
    bits = c2.multiselect("Bit widths (W = A)", list(range(2, 9)), [2, 3, 4, 8], key="w_bits")
    methods = c3.multiselect("Methods", list(METHODS), ["qimera", "gdfq"], key="w_methods")
    c1, c2, c3 = st.columns(3)
    seeds = c1.number_input("Seeds per setting", 1, 10, 1, key="w_seeds")
    epochs = c2.number_input("Epochs per run", 1, 1000, 4, key="w_epochs", help="Short runs keep a sweep quick.")
    iters = c3.number_input("Iterations per epoch", 1, 10000, 20, key="w_iters")
    chosen_teacher = common.use_teacher_choice("w_use_teacher")  # as on Quantize: the Teacher page's choice
    go = st.form_submit_button("Start sweep", type="primary")
    common.sweep_where_caption()
if go:
    try:
        warm = min(2, int(epochs) - 1)
        base = preset(base_name, **{**chosen_teacher, "epochs": int(epochs), "iters_per_epoch": int(iters),
                                    "warmup_epochs": warm, "calib_epochs": max(1, warm), "milestones": []})
        common.registry().start_sweep(base, bits, methods, range(int(seeds)))
    except (ConfigError, ValueError) as e:
        st.error(f"Cannot start the sweep: {e}")
common.jobs_section("sweep", key="bits", limit=2, curves=False)
