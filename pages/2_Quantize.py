"""Quantize: every setting of a run, live progress while it trains, and the list of runs."""
import streamlit as st

from qimera_engine import ConfigError, preset
from qimera_engine.ui import common
from qimera_engine.ui.logic import config_from_values, runs_table, settings_by_section, start_presets

common.setup_page("Quantize", "⚙️")
st.title("Quantize")
st.markdown("Train a generator against the FP teacher and fine-tune the quantized student on its images. "
            "Defaults are the paper's values; the schedule comes from the preset you start from.")

presets = start_presets()
preset_name = st.selectbox("Start from preset", list(presets), index=list(presets).index(common.teacher_preset()),
                           format_func=lambda p: f"{p}: {presets[p]}", key="q_preset")
base = preset(preset_name, **common.use_teacher_choice("q_use_teacher"))
st.caption(f"Teacher **{base.teacher}** · data **{base.test_data}**"
           + (f" · checkpoint `{base.checkpoint}`" if base.checkpoint else ""))
if st.button("Reset to preset values", key="q_reset"):
    for k in [k for k in st.session_state if str(k).startswith(f"q_{preset_name}_")]:
        del st.session_state[k]


with st.form("quantize-form"):
    values = {}
    sections = settings_by_section()
    cols = st.columns(len(sections))
    for col, (section, settings) in zip(cols, sections.items()):
        with col:
            st.markdown(f"**{section}**")
            for s in settings:
                values[s.name] = common.setting_widget(s, getattr(base, s.name), key=f"q_{preset_name}_{s.name}")
    with st.expander("Fixed coefficients (for the fixed sampler)"):
        fixed = st.text_input("Fixed coefficients", key=f"q_{preset_name}_fixed", placeholder="e.g. 0.5, 0.5",
                              help="K comma-separated values that sum to 1; used when the sampler is 'fixed'.")
    started = st.form_submit_button("Start quantizing", type="primary")

if started:
    if values["coeff_sampler"] == "fixed":
        values["fixed_coeffs"] = fixed
    try:
        cfg = config_from_values(base, values)
    except ConfigError as e:
        st.error(f"Cannot start: {e}. Your settings are kept; change the one named and start again.")
    else:
        common.registry().start_run(cfg)
        st.toast("Started: it keeps running if you switch pages or reload.")

st.header("Progress")
if not common.registry().jobs("run"):
    st.info("Nothing is running. Set the options above and press **Start quantizing**.")
common.jobs_section("run", key="quantize", limit=3)

st.header("Runs")
runs = common.all_runs()
if not runs:
    st.info("No runs yet: start one above, or press **Run the demo** on the Home page.")
else:
    table = runs_table(runs, common.registry().active_run_dirs())
    st.dataframe(table, hide_index=True, key="runs-table")
    resumable = table[table["status"].isin(["cancelled", "interrupted", "failed"])]["run"].tolist()
    if resumable:
        c1, c2 = st.columns([3, 1])
        rid = c1.selectbox("Resume a stopped run", resumable, key="q_resume_pick",
                           help="Continues from its last completed epoch.")
        if c2.button("Resume run", key="q_resume"):
            run = next(r for r in runs if r.id == rid)
            note = common.resume_note(run)
            if note:
                st.error(note)
            else:
                common.registry().start_run(None, resume=str(run.path), label=f"resume {rid}")
                st.rerun()
    common.export_panel(runs, key="q")
    common.runs_tools(runs)
