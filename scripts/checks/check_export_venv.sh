#!/usr/bin/env bash
# Check an exported folder in a fresh venv that holds only torch, transformers and safetensors.
#   bash scripts/checks/check_export_venv.sh FOLDER EXPECTED.pt [TRANSFORMERS_SPEC]
# TRANSFORMERS_SPEC defaults to the version installed beside this checkout's tests.
set -euo pipefail
folder=$1 expected=$2
spec=${3:-"transformers==$(python -c 'import transformers; print(transformers.__version__)')"}
here=$(cd "$(dirname "$0")" && pwd)
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q "$spec" safetensors
echo "venv packages: $("$venv/bin/pip" list --format=freeze | grep -iE '^(torch|transformers|safetensors)==' | tr '\n' ' ')"
cd "$(dirname "$venv")"
HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 HF_HOME="$(dirname "$venv")/hf" "$venv/bin/python" -I "$here/check_remote_code.py" "$folder" "$expected"
