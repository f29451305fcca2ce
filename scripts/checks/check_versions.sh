#!/usr/bin/env bash
# Remote code across transformers versions: export a tiny model with this checkout, then load the
# exported folder (package absent) in one fresh venv per version and compare logits and greedy output.
#   bash scripts/checks/check_versions.sh [SPEC ...]
# Default specs: the last 4.x, the first 5.x, and the newest 5.x. Needs the project venv active
# (it exports with the installed package). Exit status: non-zero if any version fails.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=("transformers==4.57.6" "transformers==5.0.0" "transformers>=5,<6")
work=$(mktemp -d)
python - "$work" <<'PY'
import sys, torch
sys.path.insert(0, ".")
from tests.test_export import export_with_expectations
from pathlib import Path
export_with_expectations(Path(sys.argv[1]) / "model", Path(sys.argv[1]) / "expected.pt")
PY
status=0
for spec in "${specs[@]}"; do
  echo "=== $spec"
  if bash "$here/check_export_venv.sh" "$work/model" "$work/expected.pt" "$spec"; then
    echo "PASS $spec"
  else
    echo "FAIL $spec"; status=1
  fi
done
rm -rf "$work"
exit $status
