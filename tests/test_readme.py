"""The README's set-up commands are the ones CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text):
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = _commands(readme)
    assert blocks[0] == "pip install -r requirements.txt && streamlit run app.py"
    test_cmd = blocks[1]
    assert test_cmd == ("python3 -m pip install -q -r requirements.txt -r tests/requirements.txt && "
                        "python3 -m pytest -q -rs --durations=15 tests")  # the slowest tests printed
    assert '-m "not slow"' in readme  # the fast lane is named
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_requirements_admit_the_served_torch():
    req = (ROOT / "requirements.txt").read_text()
    assert "torch>=2.10,<2.15" in req and "torchvision>=0.25,<0.30" in req
