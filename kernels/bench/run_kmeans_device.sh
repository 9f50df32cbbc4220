#!/usr/bin/env bash
# The k-means tests and benchmark on the GPU machine, in one call (device tool, carry the bundle):
#   bash /work/shared/device/bundle.sh build-kmeans/tests/antkv-tests build-kmeans/apps/antkv-bench-kmeans
#   cp .device/bundle.tar.xz .device/kmeans-bundle.tar.xz
#   device run: bash kernels/bench/run_kmeans_device.sh [bundle] [stages...]
# Stages (default all): tests, bench (1-bit + 0.75-bit jobs, FAISS slices), simt (0.75-bit on the SIMT
# kernel, 512 codebooks), torch (kernels/bench/kmeans_torch.py). Logs go to $OUT. Device time, measured
# 2026-11 (FAISS slice of 16 codebooks then): tests 25 s, 1-bit job 8 s + FAISS 16 x 14 s, 0.75-bit job
# ~75 s, simt 11 s, torch ~15 s: the FAISS slice dominates; keep it small (--faiss-1bit, default 4).
set -uo pipefail
bundle=${1:-.device/kmeans-bundle.tar.xz}
shift || true
stages=${*:-tests bench simt torch}
OUT=${OUT:-/tmp/kmeans-out}
mkdir -p /tmp/antkv "$OUT" && tar -C /tmp/antkv -xJf "$bundle" || exit 1
export PATH=/tmp/antkv/bin:$PATH LD_LIBRARY_PATH=/tmp/antkv/lib:/usr/local/cuda/lib64
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv > "$OUT/smi.txt" 2>&1
nproc >> "$OUT/smi.txt"
for s in $stages; do
  case $s in
    tests)
      timeout 200 antkv-tests "[kmeans]" --durations yes 2>&1 | tee "$OUT/tests.log" | grep -E "kmeans |passed|failed|FAILED|Duration|s: " | tail -60 ;;
    bench)
      timeout 300 antkv-bench-kmeans --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -v "codebooks .* done" ;;
    simt)
      timeout 120 antkv-bench-kmeans --jobs 0.75bit-simt --codebooks-075 512 --faiss-075 0 2>&1 \
        | tee "$OUT/bench_simt.log" | grep -v "codebooks .* done" ;;
    torch)
      if python3 -c "import torch" 2>/dev/null; then
        timeout 120 python3 kernels/bench/kmeans_torch.py --name 1bit --dim 8 --k 256 --codebooks 128 --batch 16 \
          --job 8192 --json "$OUT/torch_1bit.json" 2>&1 | tee "$OUT/torch.log"
        timeout 120 python3 kernels/bench/kmeans_torch.py --name 0.75bit --dim 16 --k 4096 --codebooks 8 --batch 2 \
          --job 4096 --json "$OUT/torch_075.json" 2>&1 | tee -a "$OUT/torch.log"
      else
        echo "torch: not importable on this machine" | tee "$OUT/torch.log"
      fi ;;
  esac
done
