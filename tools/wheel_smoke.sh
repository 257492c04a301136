#!/usr/bin/env bash
# Build the sdist and, from it, the wheel; check both hold every module and recipe of the checkout; install
# the wheel into a fresh venv in a temporary folder outside the repository (dependencies at the lock's
# versions) and run what a new user runs first. A file missing from the distribution fails here.
# Usage: bash tools/wheel_smoke.sh [PYTHON]   (PYTHON: the project venv's python, which has `build`)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PY=${1:-.venv/bin/python}
BASE_PY=${BASE_PYTHON:-python3}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/visionpe-wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
t0=$SECONDS

echo "wheel-smoke: building sdist and wheel (from the sdist)"
"$PY" -m build --no-isolation --sdist --outdir "$tmp/dist" . >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/dist" "$tmp"/dist/visionpe-*.tar.gz \
    >>"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }

"$PY" - "$tmp/dist" <<'PY'
import glob, os, sys, tarfile, zipfile
dist = sys.argv[1]
whl = zipfile.ZipFile(glob.glob(os.path.join(dist, "*.whl"))[0]).namelist()
sdist = tarfile.open(glob.glob(os.path.join(dist, "*.tar.gz"))[0]).getnames()
roots = {"visionpe": "visionpe", "models": "visionpe/models", "train": "visionpe/train", "eval": "visionpe/eval",
         "configs": "visionpe/configs"}
missing = []
for folder, pkg in roots.items():
    for f in glob.glob(f"{folder}/**/*", recursive=True):
        if f.endswith((".py", ".yaml")) and "__pycache__" not in f:
            if pkg + f[len(folder):] not in whl:
                missing.append(f"wheel: {pkg + f[len(folder):]}")
            if not any(n.endswith("/" + f) for n in sdist):
                missing.append(f"sdist: {f}")
if missing:
    sys.exit("wheel-smoke: the distribution lacks:\n  " + "\n  ".join(missing))
print(f"wheel-smoke: wheel holds {len(whl)} files, sdist {len(sdist)}; nothing missing")
PY

echo "wheel-smoke: installing into a fresh venv outside the repository"
"$BASE_PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --constraint "$repo/requirements/lock.txt" "$tmp"/dist/visionpe-*.whl \
    >"$tmp/install.log" 2>&1 || { cat "$tmp/install.log"; exit 1; }

cd "$tmp"  # nothing from the checkout on sys.path
"$tmp/venv/bin/python" -c "import visionpe, visionpe.models, visionpe.eval, visionpe.train, visionpe.vlm; \
print('wheel-smoke: import visionpe', visionpe.__file__.replace('$tmp', '<tmp>'))"
"$tmp/venv/bin/visionpe" list >/dev/null
echo "wheel-smoke: visionpe list ok"
"$tmp/venv/bin/visionpe" threecell --quick --encoders none,rope_mixed --epochs 1 --num-samples 600 --workers 1 \
    --no-pesi --out "$tmp/run" --cache-dir "$tmp/cache"
test -s "$tmp/run/results.md"
echo "wheel-smoke: passed in $((SECONDS - t0)) s"
