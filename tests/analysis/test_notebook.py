"""What the notebooks share: the side-by-side table, the backend table, and how the notebooks are stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flashmoe import kernels
from flashmoe.analysis import notebook

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_side_by_side_html_is_left_aligned_pre_and_escaped():
    code = "def f(x):\n    if x < 1:\n        return 'a'\n"
    page = notebook.side_by_side_html({"correct": code, "corrupted <bad>": "x\n  y"})
    assert page.count("<pre") == 2 and "text-align:right" not in page
    assert page.count("text-align:left") >= 4  # every cell and every <pre>
    assert "    if x &lt; 1:\n        return &#x27;a&#x27;" in page  # indentation kept, HTML escaped
    assert "corrupted &lt;bad&gt;" in page and page.count(code[:9]) == 1


def test_backend_status_covers_every_backend_and_says_why():
    rows = notebook.backend_status()
    assert [r[0] for r in rows] == list(kernels.BACKENDS)
    assert [r[0] for r in rows if r[1]] == kernels.available_backends()
    assert all(why and why != "unavailable" for _, _, why in rows)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_as_jupyterlab_writes_them_without_outputs(path):
    nb = json.loads(path.read_text())
    assert (nb["nbformat"], nb["nbformat_minor"]) == (4, 5)
    assert nb["metadata"]["kernelspec"] == {
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "name": "python3",
    }
    assert nb["metadata"]["language_info"] == {
        "codemirror_mode": {"name": "ipython", "version": 3},
        "file_extension": ".py",
        "mimetype": "text/x-python",
        "name": "python",
        "nbconvert_exporter": "python",
        "pygments_lexer": "ipython3",
        "version": "3.11.7",
    }
    ids = [c.get("id") for c in nb["cells"]]
    assert all(ids) and len(set(ids)) == len(ids)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
