#!/usr/bin/env bash
# Run the HF / VLM tests against every pinned transformers release.
#
# Usage: bash tools/test_compat.sh PYTHON [extra pytest args...]
#   PYTHON: the project's interpreter (e.g. .venv/bin/python), with visionpe, torch and pytest installed.
#
# For each pin file requirements/compat/transformers-<version>.txt (transformers plus exactly the versions of
# its own dependencies that differ across releases), installs those packages with
# `pip install --no-deps --target .compat/<name>` (skipped when the stamp file .compat/<name>/.pins matches
# the pin file), then runs tests/test_vlm_*.py with PYTHONPATH=.compat/<name>, so that release shadows the
# one in the main venv. Prints one summary line per version; exits 1 if any version fails (or its install
# does, or the tests import another transformers than the pinned one).
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash tools/test_compat.sh PYTHON [pytest args...]" >&2
    exit 2
fi
PY=$1
shift
cd "$(dirname "$0")/.."
ROOT=$(pwd)

shopt -s nullglob
pins=(requirements/compat/transformers-*.txt)
if [ ${#pins[@]} -eq 0 ]; then
    echo "test_compat: no pin files in requirements/compat/" >&2
    exit 2
fi

summary=()
failed=0
t_all=$(date +%s)
for pin in "${pins[@]}"; do
    name=$(basename "$pin" .txt)
    want=${name#transformers-}
    target=$ROOT/.compat/$name
    t0=$(date +%s)
    if ! cmp -s "$pin" "$target/.pins"; then
        echo "== $name: installing into .compat/$name"
        rm -rf "$target"
        if ! "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$target" -r "$pin"; then
            summary+=("$name: FAIL (pip install)")
            failed=1
            continue
        fi
        cp "$pin" "$target/.pins"
    fi
    t1=$(date +%s)
    got=$(PYTHONPATH="$target" "$PY" -c "import transformers; print(transformers.__version__)" 2>&1 | tail -n 1)
    if [ "$got" != "$want" ]; then
        summary+=("$name: FAIL (imports transformers '$got', expected $want)")
        failed=1
        continue
    fi
    echo "== $name: pytest tests/test_vlm_*.py"
    log=$(mktemp)
    PYTHONPATH="$target" "$PY" -m pytest -q -p no:cacheprovider tests/test_vlm_*.py "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    result=$(grep -E '(passed|failed|error|skipped|no tests ran|collected)' "$log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
    rm -f "$log"
    t2=$(date +%s)
    if [ "$rc" -eq 0 ]; then
        status=PASS
    else
        status=FAIL
        failed=1
    fi
    summary+=("$name: $status ($result; install $((t1 - t0)) s, tests $((t2 - t1)) s)")
done

echo
echo "== transformers compatibility ($(( $(date +%s) - t_all )) s)"
printf '%s\n' "${summary[@]}"
exit $failed
