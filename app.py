"""Qimera Explorer. Start with `streamlit run app.py`.

The app's pages, named as the sidebar shows them; Home opens first. The pages live in pages/.
"""
import streamlit as st

st.set_page_config(page_title="Qimera Explorer", page_icon="🧪", layout="wide")
st.set_option("client.showErrorDetails", "none")  # no tracebacks in the browser (ui.common.lock_down too)
st.set_option("client.toolbarMode", "minimal")

PAGES = [st.Page("pages/0_Home.py", title="Home", icon="🧪", default=True),
         st.Page("pages/7_Guided_tour.py", title="Guided tour", icon="🧭"),
         st.Page("pages/1_Teacher.py", title="Teacher", icon="🎓"),
         st.Page("pages/2_Quantize.py", title="Quantize", icon="⚙️"),
         st.Page("pages/3_Boundary_samples.py", title="Boundary samples", icon="🧬"),
         st.Page("pages/4_Feature_space.py", title="Feature space", icon="🗺️"),
         st.Page("pages/5_Bit_widths.py", title="Bit widths", icon="📉"),
         st.Page("pages/6_Compare.py", title="Compare", icon="⚖️")]
st.navigation(PAGES).run()
