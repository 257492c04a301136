#!/usr/bin/env bash
# timm's own model test suite (tests/test_models.py from timm's sdist) on the vpe_vit_tiny_* models.
#
# usage: tools/timm_suite.sh PYTHON [extra pytest args...]
#   PYTHON: an interpreter with visionpe, timm and pytest installed (e.g. .venv/bin/python).
#   TIMM_SUITE_EXCLUDE=FILE reads another exclusion list (default tools/timm_suite_exclude.txt), e.g.
#   TIMM_SUITE_EXCLUDE=/dev/null tools/timm_suite.sh .venv/bin/python -k "vpe_vit_tiny and prune"
#   runs one excluded test (a later -k replaces the script's).
#
# 1. downloads the sdist of the installed timm version with pip (cached in .cache/timm_suite/);
# 2. extracts tests/{__init__,conftest,test_models}.py and timm's pyproject.toml (pytest markers);
# 3. classifies the vpe_vit_* names the way test_models.py classifies timm's own ViTs (see
#    docs/timm.md, "timm's model test suite"): 'vpe_vit_*' joins NON_STD_FILTERS (so the config test
#    is test_model_default_cfgs_non_std, as for vit_*), stays in test_model_forward_features, and the
#    models' module ("registry") joins FEAT_INTER_FILTERS (the forward_intermediates tests, as for
#    'vision_transformer');
# 4. runs pytest under PYTHON with visionpe registered (-p visionpe.models) on -k vpe_vit_tiny, deselecting
#    exactly the cases listed in tools/timm_suite_exclude.txt (each with its reason).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 PYTHON [extra pytest args...]" >&2
    exit 2
fi
PY=$1
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
EXCLUDE=${TIMM_SUITE_EXCLUDE:-$ROOT/tools/timm_suite_exclude.txt}
PY=$(command -v "$PY" || true)
if [ -z "$PY" ]; then
    echo "timm_suite: interpreter '$1' not found" >&2
    exit 2
fi
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac

VER=$("$PY" -c 'import timm; print(timm.__version__)')
CACHE="$ROOT/.cache/timm_suite"
SDIST="$CACHE/timm-$VER.tar.gz"
mkdir -p "$CACHE"
if [ ! -f "$SDIST" ]; then
    echo "timm_suite: downloading the timm $VER sdist into .cache/timm_suite/" >&2
    "$PY" -m pip download -q --no-binary :all: --no-deps "timm==$VER" -d "$CACHE"
fi
[ -f "$SDIST" ] || { echo "timm_suite: $SDIST missing after pip download" >&2; exit 1; }

# fresh extraction each run: only the test files, never timm's package dir (the installed timm is tested)
WORK="$CACHE/timm-$VER"
rm -rf "$WORK"
tar -xzf "$SDIST" -C "$CACHE" "timm-$VER/pyproject.toml" "timm-$VER/tests/__init__.py" \
    "timm-$VER/tests/conftest.py" "timm-$VER/tests/test_models.py"

"$PY" - "$WORK/tests/test_models.py" <<'PYEOF'
import sys
path = sys.argv[1]
src = open(path).read()
edits = [  # (anchor, replacement): each anchor must occur exactly once, or the timm file changed
    ("NON_STD_FILTERS = [\n", "NON_STD_FILTERS = [\n    'vpe_vit_*',  # visionpe: ViTs, classified as timm's vit_*\n"),
    ("EXCLUDE_FEAT_FILTERS = NON_STD_FILTERS[:]\n",
     "EXCLUDE_FEAT_FILTERS = [f for f in NON_STD_FILTERS if f != 'vpe_vit_*']  # visionpe: keep features_only\n"),
    ("FEAT_INTER_FILTERS = [\n", "FEAT_INTER_FILTERS = [\n    'registry',  # visionpe: module of the vpe_vit_* entries\n"),
]
for anchor, new in edits:
    n = src.count(anchor)
    if n != 1:
        sys.exit(f"timm_suite: anchor {anchor.strip()!r} found {n} times in test_models.py (expected once); "
                 f"update tools/timm_suite.sh for this timm version")
    src = src.replace(anchor, new)
open(path, "w").write(src)
PYEOF

DESELECT=()
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in ''|'#'*) continue ;; esac
    case "$line" in
        *'#'*) ;;
        *) echo "timm_suite: exclusion without a reason in $EXCLUDE: $line" >&2; exit 1 ;;
    esac
    case=$(echo "${line%%#*}" | tr -d '[:space:]')
    # "name" deselects every parametrization of that test function (and only that function)
    case "$case" in *'['*) ;; *) case="$case[" ;; esac
    DESELECT+=(--deselect "tests/test_models.py::$case")
done < "$EXCLUDE"

cd "$WORK"
echo "timm_suite: timm $VER, $(( ${#DESELECT[@]} / 2 )) excluded test(s) from ${EXCLUDE#"$ROOT"/}" >&2
exec "$PY" -m pytest tests/test_models.py -p visionpe.models -k vpe_vit_tiny "${DESELECT[@]}" \
    -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning -q -rfEs "$@"
