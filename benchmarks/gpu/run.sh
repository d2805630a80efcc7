#!/usr/bin/env bash
# GPU verification in one command, on a bare GPU machine without network:
#
#   bash benchmarks/gpu/run.sh                  # device: carry .gpu (benchmarks/gpu/prepare.sh)
#   bash benchmarks/gpu/run.sh --cpu-dry-run    # any machine: tiny sizes on the CPU (CI)
#
# Installs the carried wheels and builds Detectron2 with its CUDA ops for the device's
# architecture (time-bounded; a CPU-ops build if the CUDA one fails, so that the rest still
# runs), then runs benchmarks/gpu/verify.py: the CUDA tests, the loss and training-step
# benchmarks and the quickstart. Everything goes under $OUT (default: a new temporary
# folder): report.md, report.json, run.log (this script's output), build.log, build.json,
# quickstart.log. The dry run builds nothing and needs Detectron2 installed.
#
# Environment: OUT (report folder), PYTHON (default python3), BUDGET (seconds for the whole
# run: 480 on the device, 150 for the dry run), TORCH_CUDA_ARCH_LIST (default: the
# device's), MAX_JOBS (default: the number of cores).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
REPO=$(pwd)
CARRY=$REPO/.gpu
SITE=/tmp/alrp-gpu-site
PYTHON=${PYTHON:-python3}

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

mode=gpu
for arg in "$@"; do
    case $arg in
        --cpu-dry-run) mode=dry ;;
        -h | --help) usage; exit 0 ;;
        *) echo "run.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done
if [ "$mode" = dry ]; then budget=${BUDGET:-150}; else budget=${BUDGET:-480}; fi
start=$(date +%s)
deadline=$((start + budget))
OUT=${OUT:-$(mktemp -d -t alrp-gpu-XXXXXX)}
mkdir -p "$OUT" || exit 2
export OUT

# Seconds left of the budget, at least 1 (timeout 0 would mean no limit).
left() {
    local s=$((deadline - $(date +%s)))
    echo $((s > 1 ? s : 1))
}

# The carried wheels, into a folder of their own on PYTHONPATH.
install_wheels() {
    local wheels=("$CARRY"/wheels/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        echo "no wheels under $CARRY/wheels: run bash benchmarks/gpu/prepare.sh on a machine with the network and carry .gpu" >&2
        return 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}"
}

# The include folders of the CUDA libraries pip installed (cusparse.h, cublas_v2.h, ...),
# which torch's headers need and a CUDA compiler without the full toolkit lacks.
pip_cuda_includes() {
    "$PYTHON" - <<'EOF'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "**", "include"), recursive=True)})
print(":".join(dirs))
EOF
}

# The CUDA toolkit to build with: $CUDA_HOME, /usr/local/cuda, nvcc's, any /usr/local/cuda-*,
# or pip's (nvidia/cu*); the first with nvcc and cuda_runtime.h.
find_cuda_home() {
    local candidate nvcc pip_homes
    nvcc=$(command -v nvcc || echo /nonexistent/bin/nvcc)
    pip_homes=$("$PYTHON" -c 'import glob, site; print(" ".join(p for r in site.getsitepackages() for p in glob.glob(r + "/nvidia/cu*")))' 2>/dev/null || true)
    # shellcheck disable=SC2086  # pip_homes: a list of folders
    for candidate in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$nvcc")")")" \
        /usr/local/cuda-* $pip_homes; do
        if [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ] && [ -e "$candidate/include/cuda_runtime.h" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# Detectron2 at the pinned commit, with its CUDA ops; a CPU-ops build if that fails.
build_detectron2() {
    local t0 arch status=failed reason="" includes limit cuda_home="" nvcc_version=""
    t0=$(date +%s)
    if "$PYTHON" -c "import detectron2._C as C, sys; sys.exit(0 if C.has_cuda() else 1)" 2>/dev/null; then
        status=preinstalled
    else
        rm -rf /tmp/alrp-d2src && mkdir -p /tmp/alrp-d2src
        if ! tar xzf "$CARRY/detectron2.tar.gz" -C /tmp/alrp-d2src; then
            reason="no $CARRY/detectron2.tar.gz: run benchmarks/gpu/prepare.sh"
        else
            arch=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
            includes=$(pip_cuda_includes)
            cuda_home=$(find_cuda_home) || cuda_home=""
            nvcc_version=$("${cuda_home:-/nonexistent}/bin/nvcc" --version 2>&1 | tail -1 || true)
            echo "CUDA toolkit: ${cuda_home:-not found}; ${nvcc_version}"
            # What is left beyond ~200 s for the tests and benchmarks, at least a minute; pip -v:
            # the compiler's progress reaches build.log even when the time limit stops it.
            limit=$(($(left) - 200))
            limit=$((limit > 60 ? limit : 60))
            echo "building detectron2 $(cat "$CARRY/detectron2.commit" 2>/dev/null) for CUDA arch $arch, ${MAX_JOBS:-$(nproc)} jobs, limit $limit s"
            if timeout -k 10 "$limit" env ${cuda_home:+CUDA_HOME="$cuda_home"} FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" \
                MAX_JOBS="${MAX_JOBS:-$(nproc)}" CPATH="${includes}${CPATH:+:$CPATH}" \
                "$PYTHON" -m pip install -v --no-build-isolation --no-deps --no-index --target "$SITE" \
                --upgrade /tmp/alrp-d2src/detectron2 >"$OUT/build.log" 2>&1; then
                status=cuda
            else
                reason="CUDA build failed or ran out of time (exit $?; build.log)"
                echo "$reason; building the CPU ops instead" | tee -a "$OUT/build.log"
                rm -rf /tmp/alrp-d2src/detectron2/build
                limit=$(($(left) - 150))
                limit=$((limit > 150 ? 150 : limit))
                if [ "$limit" -ge 30 ] && timeout -k 10 "$limit" env CUDA_VISIBLE_DEVICES= FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
                    "$PYTHON" -m pip install -v --no-build-isolation --no-deps --no-index --target "$SITE" \
                    --upgrade /tmp/alrp-d2src/detectron2 >>"$OUT/build.log" 2>&1; then
                    status=cpu-fallback
                fi
            fi
            # Keep build.log within what comes back: its end holds the error.
            tail -c 2000000 "$OUT/build.log" >"$OUT/build.log.tmp" && mv "$OUT/build.log.tmp" "$OUT/build.log"
        fi
    fi
    cat >"$OUT/build.json" <<EOF
{"status": "$status", "seconds": $(($(date +%s) - t0)), "arch": "${arch:-}", "reason": "$reason",
 "cuda_home": "$cuda_home", "nvcc": "$nvcc_version",
 "commit": "$(cat "$CARRY/detectron2.commit" 2>/dev/null)", "wheels_seconds": ${wheels_seconds:-null}}
EOF
    echo "detectron2: $status in $(($(date +%s) - t0)) s ${reason:+($reason)}"
    [ "$status" != failed ]
}

main() {
    echo "== run.sh ($mode): $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${budget} s, report in $OUT"
    local build_args=()
    if [ "$mode" = gpu ]; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
        local t0
        t0=$(date +%s)
        echo "== wheels"
        install_wheels || echo "wheels: install failed"
        wheels_seconds=$(($(date +%s) - t0))
        export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
        echo "== detectron2"
        build_detectron2 || echo "detectron2: no build; the sections that need it will fail"
        build_args=(--build-json "$OUT/build.json")
    else
        export CUDA_VISIBLE_DEVICES=""
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    fi
    echo "== verify.py ($(left) s left)"
    local dry=()
    [ "$mode" = dry ] && dry=(--cpu-dry-run)
    PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore timeout -k 10 "$(left)" "$PYTHON" benchmarks/gpu/verify.py \
        --out "$OUT" --deadline "$((deadline - 5))" "${dry[@]}" "${build_args[@]}"
    local status=$?
    echo "== run.sh: exit $status after $(($(date +%s) - start)) s; report: $OUT/report.md"
    return "$status"
}

main 2>&1 | tee -a "$OUT/run.log"
exit "${PIPESTATUS[0]}"
