# Sourced by scripts/test.sh and scripts/quickstart.sh: the project's virtual
# environment with torch's CPU build installed first (a bare `torch` would pull a
# CUDA build), then the project with the extras named in $1.
PY=${PYTHON:-python3}
VENV=${EDGEMETA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$1]"
