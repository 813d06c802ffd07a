"""The ``edgemeta`` command line: one typer app, one library call per command.

Commands are grouped by area in the modules of this package; each module registers
its commands on :data:`app`. Heavy libraries (torch, onnx) are imported inside
the commands that need them, so the device commands work on a runtime-only install.
"""

from __future__ import annotations

from edgemeta.cli import bench_cmds as _bench_cmds  # noqa: F401,E402

# Importing the command modules registers their commands on `app`.
from edgemeta.cli import core as _core  # noqa: F401,E402
from edgemeta.cli import export_cmds as _export_cmds  # noqa: F401,E402
from edgemeta.cli import runtime_cmds as _runtime_cmds  # noqa: F401,E402
from edgemeta.cli._app import app, main

__all__ = ["app", "main"]
