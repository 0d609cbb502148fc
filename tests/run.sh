#!/usr/bin/env bash
# The single test command: installs the package and its test dependencies into .venv
# (creating it if absent), checks formatting and lint, then runs the tests.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k config -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python

# Runs pip quietly; its output (setuptools' notes on editable installs, warnings about
# index locations) is shown only when it fails.
quiet_pip() {
  local log
  if ! log=$("$PY" -m pip --disable-pip-version-check "$@" 2>&1); then
    echo "$log" >&2
    echo "tests/run.sh: pip $* failed" >&2
    return 1
  fi
}

# torch must be the CPU build: where pip would pick PyPI's CUDA build (several GB), stop
# before downloading it. README.md ("Pinned versions") says how to install the CPU build.
if ! "$PY" -c "import importlib.metadata as m; m.version('torch')" 2>/dev/null; then
  report=$(mktemp)
  trap 'rm -f "$report"' EXIT
  quiet_pip install --quiet --dry-run --ignore-installed --report "$report" 'torch==2.13.0'
  "$PY" - "$report" <<'PYEOF'
import json, sys
picked = {p["metadata"]["name"].lower(): p["metadata"]["version"]
          for p in json.load(open(sys.argv[1]))["install"]}
if not picked["torch"].endswith("+cpu") or any(n.startswith("nvidia-") for n in picked):
    sys.exit(f"tests/run.sh: pip would install torch {picked['torch']}, not the CPU build; "
             "install torch==2.13.0 from PyTorch's CPU index first (see README.md)")
PYEOF
fi

quiet_pip install --quiet -e '.[test]'

# The demo's browser test (tests/demo/test_browser.py) drives Debian's chromium through its
# chromedriver; install them with apt where they are missing (as root, or through sudo).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt=()
  if [[ $(id -u) == 0 ]]; then
    apt=(apt-get)
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    apt=(sudo -n apt-get)
  fi
  if [[ ${#apt[@]} -gt 0 ]]; then
    echo "tests/run.sh: installing chromium and chromium-driver (apt) for the browser test" >&2
    if ! log=$( (DEBIAN_FRONTEND=noninteractive "${apt[@]}" update -qq &&
                 DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq chromium \
                   chromium-driver) 2>&1); then
      echo "$log" >&2
      echo "tests/run.sh: apt could not install chromium; the browser test will fail" >&2
    fi
  else
    echo "tests/run.sh: chromium is missing and apt needs root: the browser test will fail" >&2
  fi
fi
"$PY" -m ruff format --check .
"$PY" -m ruff check .
"$PY" -m pytest -n 2 --durations=25 tests "$@"
