#!/usr/bin/env bash
# Installs Label Studio (pinned) into its own virtualenv for the end-to-end test.
# Usage: tests/e2e/install_labelstudio.sh [VENV_DIR]   (default .venv-labelstudio)
set -euo pipefail
VENV="${1:-.venv-labelstudio}"
VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-$VERSION"
if [ -f "$STAMP" ]; then exit 0; fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "label-studio==$VERSION"
# importing is enough (`label-studio --version` starts Django and checks PyPI)
"$VENV/bin/python" -c "import label_studio, sys; assert label_studio.__version__ == sys.argv[1], label_studio.__version__" "$VERSION"
touch "$STAMP"
