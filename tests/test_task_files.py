"""Task files that cannot be read are a ValueError naming the file (issue 22, item 12)."""

from __future__ import annotations

import pytest

from unmask.eval.tasks import get_task, load_items

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name, content, message", [
    ("piqa.jsonl", DEEP.encode() + b"\n", r"piqa\.jsonl: line 1 is nested too deeply"),
    ("piqa.jsonl", b'{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n\n' + DEEP.encode(),
     r"piqa\.jsonl: line 3 is nested too deeply"),
    ("piqa.json", DEEP.encode(), r"piqa\.json is nested too deeply"),
    ("piqa.jsonl", b'{"goal": "caf\xe9"}\n', r"piqa\.jsonl is not UTF-8 text \(byte 13"),
    ("piqa.jsonl", b'{"label": ' + b"7" * 5000 + b"}\n", r"piqa\.jsonl: line 1 is not readable JSON"),
], ids=["deep-line", "deep-later-line", "deep-json", "latin-1", "huge-integer"])
def test_unreadable_task_files_name_the_file(tmp_path, name, content, message):
    """Before: a RecursionError traceback for deep nesting; a UnicodeDecodeError naming no file."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_items(get_task("piqa"), tmp_path)
