"""The app's helpers. ``figures`` and ``logic`` are plain Python (tested without a UI);
``common`` is the one module here that imports Streamlit (pages import it, the engine never does).
"""
