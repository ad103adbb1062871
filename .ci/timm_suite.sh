#!/usr/bin/env bash
# Runs timm's own model test-suite (tests/test_models.py of the installed timm version, unmodified) on every
# rwkvunet_* encoder. The source distribution of that exact timm version is fetched from the package index;
# `-p rwkvunet` registers the encoders before collection. Tests that need the network (*pretrained*) are left out.
#   bash .ci/timm_suite.sh            (about 4 minutes on 2 cores)
set -euo pipefail
PY="${PYTHON:-python}"
VERSION="$("$PY" -c 'import timm; print(timm.__version__)')"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download --quiet --no-deps --no-binary :all: "timm==$VERSION" -d "$WORK"
tar xzf "$WORK/timm-$VERSION.tar.gz" -C "$WORK"
"$PY" -m pip install --quiet pytest-timeout
cd "$WORK/timm-$VERSION"
echo "timm $VERSION: tests/test_models.py on rwkvunet_*"
"$PY" -m pytest -p rwkvunet -p no:cacheprovider -q -W ignore -k "rwkvunet and not pretrained" tests/test_models.py
