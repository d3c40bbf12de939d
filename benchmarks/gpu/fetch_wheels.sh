#!/usr/bin/env bash
# Run HERE, on the development machine (pip reaches a package index or the local mirror):
# downloads into .whl/ (in .gitignore) the wheels that the lent GPU machine's image lacks, built
# for its Python 3.12: pydantic and datasets (tether's own dependencies) and TRL (`bench trl`),
# each at the version this checkout's .venv runs (the versions the suite passed with).
# Then benchmarks/gpu/check.sh runs there with `.whl` carried. See docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PACKAGES="pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess trl"
pins=()
for name in $PACKAGES; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  if [ -z "$version" ]; then
    echo "error: $name is not installed in $PY; run 'make install' first" >&2
    exit 2
  fi
  pins+=("$name==$version")
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls .whl
du -sh .whl
