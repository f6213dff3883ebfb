#!/usr/bin/env bash
# Installs Label Studio (pinned) into its own virtualenv for the end-to-end test, and migrates a template
# database once (a fresh database takes about a minute to migrate; the test copies the template instead).
# Usage: tests/e2e/install_labelstudio.sh [VENV_DIR]   (default .venv-labelstudio)
set -euo pipefail
VENV="${1:-.venv-labelstudio}"
VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-$VERSION"
TEMPLATE="$VENV/template-data"
if [ ! -f "$STAMP" ]; then
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "label-studio==$VERSION"
  "$VENV/bin/python" -c "import label_studio, sys; assert label_studio.__version__ == sys.argv[1], label_studio.__version__" "$VERSION"
  touch "$STAMP"
fi
if [ ! -f "$TEMPLATE/.migrated-$VERSION" ]; then
  rm -rf "$TEMPLATE" "$TEMPLATE.tmp"
  mkdir -p "$TEMPLATE.tmp/home"
  # `label-studio version` applies the migrations and exits; keep it off $HOME and off PyPI
  env HOME="$PWD/$TEMPLATE.tmp/home" LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false SENTRY_DSN= \
    FRONTEND_SENTRY_DSN= "$VENV/bin/label-studio" version --data-dir "$TEMPLATE.tmp/data" >/dev/null 2>&1
  test -f "$TEMPLATE.tmp/data/label_studio.sqlite3"
  rm -rf "$TEMPLATE.tmp/home"
  mv "$TEMPLATE.tmp/data" "$TEMPLATE" && rmdir "$TEMPLATE.tmp"
  touch "$TEMPLATE/.migrated-$VERSION"
fi
