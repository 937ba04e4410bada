#!/usr/bin/env bash
# Prepare, where pip reaches PyPI, the wheels that bench/gpu_proof.sh installs on a GPU machine with no
# network: the PyTorch references and what they need beyond that machine's image (Python 3.12, x86-64
# manylinux, with torch, torchvision, numpy, scipy, tqdm, regex, packaging already there).
#
#   bash bench/gpu_proof_wheels.sh [DEST]        # default DEST: .whl (git-ignored); replaces its wheels
#
# Then carry DEST to the GPU machine (the device tool's carry: [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python=${PYTHON:-python3}
target=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

# Pinned: the versions this project's tests run against.
binary=(
    clip-anytorch==2.6.0     # OpenAI CLIP, the reference's guidance network (needs ftfy, regex, torch, torchvision)
    kornia==0.9.0            # the reference's augmentations (needs kornia_rs, numpy, torch)
    kornia_rs==0.2.0         # compiled: a cp312 manylinux wheel
    lpips==0.1.4             # the reference's LPIPS (needs numpy, scipy, torch, torchvision, tqdm)
    ftfy==6.3.1              # clip's tokenizer (needs wcwidth)
    wcwidth==0.9.4
    setuptools==80.10.2      # pkg_resources for clip; installed only where the image lacks it
)
sdist_only=(
    guided-diffusion-sdk==1.0.0   # ADM's UNet and diffusion; pure Python, only an sdist on PyPI
)
# Not carried: guided-diffusion-sdk's blobfile (only its dist_util/logger file I/O use it; the proof
# imports unet, gaussian_diffusion and respace).

mkdir -p "$dest"
rm -f "$dest"/*.whl
"$python" -m pip download -q --no-deps --only-binary=:all: "${target[@]}" -d "$dest" "${binary[@]}"
"$python" -m pip wheel -q --no-deps -w "$dest" "${sdist_only[@]}"
for wheel in "$dest"/guided_diffusion_sdk-*.whl; do
    case "$wheel" in
        *-py3-none-any.whl) ;;
        *) echo "error: $wheel is not a pure-Python wheel" >&2; exit 1 ;;
    esac
done

# Every wheel must install for the GPU machine's interpreter and platform (one version of each).
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
"$python" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: "${target[@]}" \
    --target "$check" "$dest"/*.whl
names=$(ls "$dest"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort)
if [ -n "$(uniq -d <<<"$names")" ]; then
    echo "error: two versions of $(uniq -d <<<"$names") in $dest" >&2
    exit 1
fi
ls -l "$dest"/*.whl
du -ch "$dest"/*.whl | tail -1
