"""Write the model-coverage matrix (tests/model_matrix.py) into README.md between its markers.

    python scripts/model_matrix.py          # measures every family (about a minute on two idle cores)

tests/test_model_matrix.py fails when the README's table differs from what the same rows render.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the matrix's families and measurements live with the tests

from model_matrix import README_END, README_START, all_families, measure, render  # noqa: E402


def main() -> None:
    readme_path = REPO / "README.md"
    readme = readme_path.read_text()
    table = render([measure(family) for family in all_families()])
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    readme_path.write_text(f"{readme[:start]}\n{table}\n{readme[end:]}")
    print(table)


if __name__ == "__main__":
    main()
