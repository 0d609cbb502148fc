"""The test tree's own rule: test modules have unique basenames.

Test folders are not packages, so pytest imports each test module by its basename; two
files of one name in different folders make the second fail to collect ("import file
mismatch") in a full run, though each passes alone.
"""

import collections
import pathlib


def test_test_module_basenames_are_unique():
    root = pathlib.Path(__file__).parent
    names = collections.Counter(p.name for p in root.rglob("test_*.py"))
    assert [n for n, count in names.items() if count > 1] == []
