"""Every ```python block in README.md runs as written (docs that run).

Blocks run in order in one namespace, as a reader would paste them into one
session: a block may continue the example of the block before it.
"""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


def test_readme_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save files write them here
    namespace = {"__name__": "__readme__"}
    for index, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
