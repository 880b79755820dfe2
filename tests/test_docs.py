"""Every Python block of the README and of docs/ runs as pasted (on a GPU, on it), and a
``print(...)  # text`` line in one prints that text: no block can rot."""

import contextlib
import io
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.either_session

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PRINTED = re.compile(r"^\s*print\(.*\)\s+# (.+)$", re.M)


def blocks() -> list:
    found = []
    for path in DOCUMENTS:
        for i, match in enumerate(BLOCK.finditer(path.read_text())):
            found.append(pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}:{i + 1}"))
    return found


def test_the_readme_and_docs_have_python_blocks():
    names = {block.id.split(":")[0] for block in blocks()}
    assert {"README.md", "docs/ops.md", "docs/training.md"} <= names


@pytest.mark.parametrize("code", blocks())
def test_block_runs_as_pasted(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, "<block>", "exec"), {"__name__": "__block__"})
    for expected in PRINTED.findall(code):
        assert expected.strip() in output.getvalue(), f"the block says it prints {expected!r}; it printed:\n" \
                                                      f"{output.getvalue()}"
