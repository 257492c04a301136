"""Every python block of docs/vlm.md runs as written (blocks that use transformers need it installed;
under CI a missing transformers fails instead of skipping)."""
import os
import re

import pytest

from conftest import importorskip_or_fail

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "vlm.md")


def _blocks():
    with open(DOC) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


BLOCKS = _blocks()


def test_the_doc_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_block_runs(index, capsys):
    code = BLOCKS[index]
    if re.search(r"attach_scheme|tiny_qwen_vl|tiny_causal_lm", code):
        importorskip_or_fail("transformers")
    exec(compile(code, f"docs/vlm.md block {index}", "exec"), {"__name__": "__doc_block__"})
    printed = capsys.readouterr().out
    for comment in re.findall(r"print\(.*?\)\s+# (.+)", code):  # a printed value the doc states
        expected = re.split(r"\s+\(", comment)[0].strip()  # "value (explanation)"
        assert expected in printed, (expected, printed)
