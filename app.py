"""dinoapp's Gradio app entry point (``python app.py``).

The interactive feature explorer and head trainer is built in the app issue; until then this
entry point says so instead of pretending. Use the library or the ``dinoapp`` CLI meanwhile.
"""

from __future__ import annotations

import sys


def main() -> int:
    print(
        "The dinoapp Gradio app is not built yet (tracked in the app issue).\n"
        "Meanwhile: `dinoapp info vits16`, or in Python `dinoapp.load_backbone(...)` and `dinoapp.extract(...)`.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
