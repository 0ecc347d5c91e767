#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md and the gpu-marked tests, in one run on a machine with one CUDA GPU.
#
#   [STEPS="embed_processes ..."] bash benchmarks/gpu_rows.sh OUT [QUICK]
#
# Runs, each under its own time limit (the most wanted first), writing a log and a JSON file per step into OUT:
#   - facesearch bench speed embed on the GPU: the paper-size Fast-Model (width 1, 112x96, bf16), 40,000 synthetic
#     faces with landmarks in shards of 5,000, one GPU worker, decode and alignment in processes (the default) with
#     one and with two shards at a time and, for comparison, on 8 threads of the worker (the layout before decode
#     processes);
#   - facesearch bench speed crop-store on the GPU: training input with and without the crop store against the
#     training step alone, at the paper's batch of 48 and at 256;
#   - pytest -m gpu (the CUDA twins of the CPU tests: inference, masks, exact search, resident gallery).
# STEPS picks and orders them (embed_processes embed_processes_t2 crop_store_b48 gpu_tests embed_threads
# crop_store_b256, the default).
# QUICK=1 shrinks every size (a check of the script itself, not a measurement).  Run from anywhere: the commands run
# in a scratch folder so that an installed facesearch is imported, not the checkout's application folder.
set -u
out=$(realpath -m "${1:?usage: gpu_rows.sh OUT [QUICK]}")
quick=${2:-0}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
device=${DEVICE:-cuda}  # DEVICE=cpu: the same steps on the CPU (a check of the script)
mkdir -p "$out"
cd "$(mktemp -d)" || exit 1
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run, log to OUT/NAME.log, report the exit status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s"
    tail -n 30 "$out/$name.log"
}

if [ "$quick" = 1 ]; then ids=8 per=10 rows=40 crop_images=96 crop_ids=8; else
    ids=1600 per=25 rows=5000 crop_images=6000 crop_ids=200; fi
steps=${STEPS:-embed_processes embed_processes_t2 crop_store_b48 gpu_tests embed_threads crop_store_b256}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

embed() {  # embed NAME OPTIONS...: the paper-size Fast-Model on the synthetic faces
    step "$1" 200 "$py" -m facesearch bench speed embed --device "$device" --precision bf16 --width 1 \
        --input-size 112x96 --batch-size 256 --shard-rows "$rows" --identities "$ids" --images-per-identity "$per" \
        --repeats 1 --json "$out/$1.json" "${@:2}"
}
crop() {  # crop BATCH
    step "crop_store_b$1" 150 "$py" -m facesearch bench speed crop-store --device "$device" --precision bf16 \
        --arch fast --width 1 --input-size 112x96 --batch-size "$1" --images "$crop_images" \
        --identities "$crop_ids" --workers 8 --json "$out/crop_store_b$1.json"
}
for name in $steps; do
    case $name in
        embed_processes) embed "$name" ;;
        embed_processes_t2) embed "$name" --threads-per-worker 2 ;;
        embed_threads) embed "$name" --decode-processes 0 --threads-per-worker 8 ;;
        crop_store_b*) crop "${name#crop_store_b}" ;;
        gpu_tests) step gpu_tests 120 "$py" -m pytest -q -m gpu --import-mode=importlib -p no:cacheprovider \
            --rootdir "$repo" "$repo/tests/model/test_gpu.py" "$repo/tests/model/test_masks.py" \
            "$repo/tests/indexer/test_search.py" ;;
        *) echo "unknown step $name" ;;
    esac
done
# the device tool brings back at most 8 files: the JSON results travel as one archive beside the logs
(cd "$out" && tar czf results_json.tgz ./*.json && rm -f ./*.json)
