#!/usr/bin/env bash
# One call on the lent GPU machine, from the repository root: the stages named
# on the command line, each under its own time limit, every output packed into
# one archive (the device tool returns at most 8 files).
#
#   bash benchmarks/gpu_run.sh tests demo bench-llama2 bench-rest
#
# Stages and their rough time on 2 x H100: tests (gpu tests, ~80 s), peers
# (peer correctness, needs .whl carried), demo (~20 s), bench-llama2 (every
# method, ~150 s), bench-rest (llama3-gqa and dit-mha, every method, ~270 s), bench-masks
# (llama3-gqa-docs and llama3-gqa-window: packed documents, a window), decode (a KV cache's
# decode step on one GPU, benchmarks/decode_cache.py), cache-tests (tests/test_gpu_cache.py),
# dit-step (a video DiT's attention calls per denoising step, benchmarks/dit_step_host.py),
# graph (CUDA-graph probe, ~40 s), host (host-time profile, ~30 s), overhead (host time
# per call against SDPA and a minimal ring, benchmarks/host_overhead.py, ~90 s), breakdown
# (one gloo call's host time phase by phase, benchmarks/host_breakdown.py, ~60 s), calibrate
# (tokenring calibrate: the planner's per-device table, ~40 s), masks (block kernels under
# document and window masks against dense causal cuDNN, benchmarks/mask_kernels.py).
# Summaries go to stdout; $OUT/gpu-run.tgz holds the logs, JSON and pictures.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="src:tests${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-gpu-run-out}"
work="$(mktemp -d)"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi here"

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$work/$name.log" 2>&1
    echo "   exit $?"
    grep -E "passed|failed|FAILED|error|all [0-9]+ cases|row\(s\) failed|x  met|MISSED" "$work/$name.log" | tail -30
}

for s in "$@"; do
    case $s in
        tests) stage tests 300 env TOKENRING_GPU_RECORD="$work/gpu-tests.jsonl" \
            python -m pytest -m gpu tests/test_gpu.py tests/test_gpu_cache.py -q -p no:cacheprovider ;;
        peers) stage peers 300 python -m pytest -m gpu tests/test_peers.py -q -p no:cacheprovider ;;
        demo) stage demo 120 python -m tokenring_bench.cli demo --output "$work/demo-timeline.png" ;;
        bench-llama2) stage bench-llama2 280 python -m tokenring_bench.cli bench --cases llama2-mha \
            --output-dir "$work/bench-llama2" --timeout 270 ;;
        bench-rest) stage bench-rest 420 python -m tokenring_bench.cli bench --cases llama3-gqa dit-mha \
            --output-dir "$work/bench-rest" --timeout 410 ;;
        bench-masks) stage bench-masks 300 python -m tokenring_bench.cli bench \
            --cases llama3-gqa-docs llama3-gqa-window --output-dir "$work/bench-masks" --timeout 290 ;;
        graph) stage graph 120 python benchmarks/graph_probe.py ;;
        host) stage host 90 python benchmarks/host_profile.py ;;
        overhead) stage overhead 240 python benchmarks/host_overhead.py --json "$work/host-overhead.json" ;;
        breakdown) stage breakdown 120 python benchmarks/host_breakdown.py ;;
        decode) stage decode 300 python benchmarks/decode_cache.py --json "$work/decode-cache.json" ;;
        dit-step) stage dit-step 200 python benchmarks/dit_step_host.py --json "$work/dit-step.json" ;;
        cache-tests) stage cache-tests 200 python -m pytest -m gpu tests/test_gpu_cache.py -q \
            -p no:cacheprovider ;;
        masks) stage masks 240 python benchmarks/mask_kernels.py --json "$work/mask-kernels.json" ;;
        calibrate) stage calibrate 240 python -m tokenring_bench.cli calibrate \
            --output "$work/calibrated-topology.json" ;;
        *) echo "unknown stage $s" ;;
    esac
done
mkdir -p "$out"
tar czf "$out/gpu-run.tgz" -C "$work" .
echo "outputs: $out/gpu-run.tgz"
