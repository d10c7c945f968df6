"""The README's file table must stay honest: every file it lists exists, and its line count is within 10% of
the real one (so a reader's first impression of the codebase's size is true). Update the table when a file grows."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table_rows():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    # rows look like: | `vmamba.py` | 771 | what it is |
    return re.findall(r"^\| `([\w./]+)` \| (\d+) \|", text, flags=re.M)


def test_file_table_line_counts_are_honest():
    rows = _table_rows()
    assert len(rows) >= 8, f"README file table not found or too short: {rows}"
    for name, claimed in rows:
        path = os.path.join(ROOT, name)
        assert os.path.isfile(path), f"README lists {name}, which does not exist"
        with open(path, encoding="utf-8") as f:
            real = sum(1 for _ in f)
        assert abs(real - int(claimed)) <= 0.1 * real, f"README says {name} has {claimed} lines, it has {real}"


def test_every_top_level_source_file_is_in_the_table():
    listed = {name for name, _ in _table_rows()}
    for name in os.listdir(ROOT):
        if name.endswith((".py", ".cu")):
            assert name in listed, f"{name} is missing from the README's file table"
