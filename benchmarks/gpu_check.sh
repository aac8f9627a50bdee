#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU; prints every figure (and keeps them under $OUT if set).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with splitnn and a CUDA torch installed
#
# 1. the CUDA tests (tests/workers/test_devices_cuda.py: a split on the GPU vs the same on the CPU, mixed
#    CPU/GPU parties fused and eager, several values at a cut, `splitnn worker --device cuda:0` processes,
#    the same ledger bytes as on the CPU, everything handed back on the CPU);
# 2. benchmarks/bench_resnet.py on the GPU: the in-process split ResNet vs the unsplit model (medians, ratio),
#    at width 16 (the example's) and 64, and with mixed parties (bob alone on the GPU);
# 3. examples/resnet_fashion.py for 5 epochs with every party on the GPU, if Fashion-MNIST is found
#    ($FASHION_MNIST, else ../shared/data/fashion-mnist or shared/data/fashion-mnist).
# 4. the two WAN targets a 2-core machine cannot settle (issue 14), on this machine's many cores: networked
#    pipelined training at 0 ms against in-process (a core per party), and the data plane's ns/byte through fit.
# Takes a few minutes on one GPU. Exit status: that of the tests.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
echo "== environment (results under $OUT)"
$PY - <<'PY' || exit 1
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible: nothing to check here")
print("GPU:", torch.cuda.get_device_name(0), "| devices:", torch.cuda.device_count())
PY

echo "== CUDA tests"
$PY -m pytest -q -m cuda -p no:cacheprovider -rA tests/workers/test_devices_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt"
rc=${PIPESTATUS[0]}

echo "== split vs unsplit ResNet on the GPU"
$PY benchmarks/bench_resnet.py --device cuda --threads 4 --steps 100 --repeats 7 --json "$OUT/bench_resnet_cuda_w16.json"
$PY benchmarks/bench_resnet.py --device cuda --threads 4 --steps 100 --repeats 7 --width 64 \
    --json "$OUT/bench_resnet_cuda_w64.json"
$PY benchmarks/bench_resnet.py --device cpu,cuda,cpu --threads 4 --steps 20 --repeats 3 \
    --json "$OUT/bench_resnet_mixed.json"

DATA=${FASHION_MNIST:-}
for d in ../shared/data/fashion-mnist shared/data/fashion-mnist; do
    [ -z "$DATA" ] && [ -d "$d" ] && DATA=$d
done
if [ -n "$DATA" ]; then
    echo "== examples/resnet_fashion.py on the GPU ($DATA)"
    $PY examples/resnet_fashion.py --device cuda --data-dir "$DATA" 2>&1 | tee "$OUT/resnet_fashion_cuda.txt"
else
    echo "== Fashion-MNIST not found (set FASHION_MNIST=DIR): example skipped"
fi
echo "== networked pipelined training at 0 ms against in-process, a core per party (CPU; loopback, no emulator)"
OMP_NUM_THREADS=1 $PY benchmarks/bench_network.py --parties 1,16,24 --batches 300 --runs 3 --data-plane grpc,tcp --op-cpu 2>&1 \
    | tee "$OUT/bench_network_parties.txt" | tail -9
echo "== the same behind the link emulator at 0 ms, peer links over the TCP data plane"
OMP_NUM_THREADS=1 $PY benchmarks/bench_wan.py --delays 0 --pipeline 1,8,16,24 --predict 0.5 --batches 300 --runs 3 \
    --data-plane tcp --json "$OUT/bench_wan_0ms_tcp.json" 2>&1 | tail -8
echo "== the data plane's cost per byte through fit (CPU), gRPC and TCP links interleaved"
OMP_NUM_THREADS=1 $PY benchmarks/bench_network.py --sweep 64,128,256,512,1024 --batches 16 --runs 11 \
    --data-plane grpc,tcp 2>&1 | tee "$OUT/bench_network_sweep.txt" | tail -20
echo "== CUDA tests exit status: $rc"
exit "$rc"
