#!/usr/bin/env bash
# Write the example reports again from this tree, as a newcomer would: a fresh folder (new MLflow store, new
# Ray results), the README's main command, then the two other studies; the reports replace the ones here.
# tests/test_example_report.py holds the committed reports to the tree's source digest: run this after any
# change to vadclip/, study/ or search_spaces/ (about 10 minutes on 2 CPU cores).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
python -m study.run ablation_lgt
python -m study.run reproduce
python -m study.run search_window
for file in "$here"/*; do
  name=$(basename "$file")
  case "$name" in README.md | regenerate.sh) continue ;; esac
  cp "reports/$name" "$here/$name"
done
echo "example reports written to $here"
