"""Write the runtime's resize graphs (``runtime/graphs/levels_<colour>_<filter>.onnx``): the
``pixels`` entry's colour rules and resize on their own, which the runtime runs on every
image it resizes (training data included), so that one resize serves every path. Run it
after changing ``exporters/pixels.py``; a test fails while the shipped files differ from
what this writes.

    python scripts/make_runtime_graphs.py
"""

from __future__ import annotations

from pathlib import Path

from edgemeta.exporters.pixels import RESIZE_MODES, levels_model
from edgemeta.runtime.preprocess import levels_graph_path


def main() -> None:
    for channels in (1, 3):
        for interpolation in RESIZE_MODES:
            path = levels_graph_path(channels, interpolation)
            path.parent.mkdir(parents=True, exist_ok=True)
            data = levels_model(channels, interpolation).SerializeToString(deterministic=True)
            path.write_bytes(data)
            print(f"{Path(*path.parts[-3:])}: {len(data)} bytes")


if __name__ == "__main__":
    main()
