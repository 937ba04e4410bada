#!/usr/bin/env bash
# The GPU proof in one command, on a bare GPU machine whose python3 has jax (with its CUDA plugin), flax,
# torch and transformers but not the PyTorch references: installs the wheels that
# bench/gpu_proof_wheels.sh prepared in .whl/ (guided-diffusion-sdk, clip-anytorch, kornia, kornia_rs,
# lpips, ftfy, wcwidth) into a private directory, then runs bench/gpu_proof.py from this checkout
# (no `pip install -e .`: the repository root goes on PYTHONPATH) and keeps a log.
#
#   bash bench/gpu_proof.sh OUT_DIR [bench.gpu_proof flags, e.g. --budget_s=450]
#
# Writes OUT_DIR/gpu_proof.json (after every phase) and OUT_DIR/gpu_proof.log; exits with the proof's status.
# Environment: PYTHON (default python3), GPU_PROOF_WHEELS (default .whl), GPU_PROOF_SITE (where the
# wheels go, default /tmp/bdjax_gpu_proof_site).
set -uo pipefail

if [ $# -lt 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash bench/gpu_proof.sh OUT_DIR [bench.gpu_proof flags]" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-python3}
wheels=${GPU_PROOF_WHEELS:-.whl}
site=${GPU_PROOF_SITE:-/tmp/bdjax_gpu_proof_site}
log="$out/gpu_proof.log"
: >"$log"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

shopt -s nullglob
install=() setuptools=()
for wheel in "$wheels"/*.whl; do
    case "$(basename "$wheel")" in
        setuptools-*) setuptools+=("$wheel") ;;  # only where the image lacks pkg_resources (below)
        *) install+=("$wheel") ;;
    esac
done
mkdir -p "$site"
if [ ${#install[@]} -gt 0 ]; then
    echo "installing ${#install[@]} wheels from $wheels into $site" | tee -a "$log"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "${install[@]}" 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "error: installing the wheels failed" | tee -a "$log" >&2; exit 1; }
else
    echo "no wheels in $wheels: using the packages $python already has" | tee -a "$log"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# clip-anytorch imports pkg_resources, which setuptools 81 removed.
if [ ${#setuptools[@]} -gt 0 ] && ! "$python" -c "import pkg_resources" >/dev/null 2>&1; then
    echo "installing ${setuptools[*]} (this python has no pkg_resources)" | tee -a "$log"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "${setuptools[@]}" 2>&1 | tee -a "$log"
fi

"$python" -m bench.gpu_proof --output="$out/gpu_proof.json" "$@" 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
