#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that benchmarks/gpu_check.sh installs on a GPU machine that has
# PyTorch and transformers but cannot fetch anything (docs/benchmarks.md, "GPU check"). Writes .whl/ (git-ignored by
# the line this adds to .git/info/exclude). Versions: the ones this project is tested with on CPU.
#
#   bash benchmarks/gpu_wheels.sh                    # CPython 3.12, manylinux x86-64 (the default GPU image)
#   PY_VERSION=3.11 bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
PY_VERSION=${PY_VERSION:-3.12}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# pure-Python packages the GPU image lacks; add transformers==5.24.0 / pyarrow if the image's are too old
# (trl 1.16 needs transformers >= 4.56.2; datasets 5.2 needs pyarrow >= 24 and huggingface-hub >= 1.31)
PACKAGES=${PACKAGES:-"trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"}
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${PLATFORMS[@]}" -d .whl $PACKAGES
python3 -m pip wheel --no-deps -w .whl .  # this package (the checkout itself also works: gpu_check.sh puts it first)
ls -la .whl
