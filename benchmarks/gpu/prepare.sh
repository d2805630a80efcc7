#!/usr/bin/env bash
# Gathers on this machine (network, any CPU) what the GPU machine lacks into .gpu/ of the
# checkout (ignored by git), for benchmarks/gpu/run.sh to use there:
#
#   bash benchmarks/gpu/prepare.sh [DETECTRON2_SOURCE]
#
#   .gpu/detectron2.tar.gz   Detectron2's source at the commit alrp_d2/install_detectron2.py pins
#   .gpu/detectron2.commit   that commit
#   .gpu/wheels/*.whl        the Python 3.12 wheels the device lacks (fvcore, iopath, antlr4,
#                            pycocotools, yacs, omegaconf, hydra-core, termcolor)
#
# DETECTRON2_SOURCE (argument or environment variable): a git repository of Detectron2
# (bare or not) that holds the pinned commit, or a .tar.gz of its source at that commit
# (git archive). Default: the workplace's mirror /work/.mirror/facebookresearch+detectron2/repo,
# else a shallow fetch of that commit from GitHub.
# Then prints the device call: carry [".gpu"], command "bash benchmarks/gpu/run.sh".
# Checks that the carried folder and the working tree fit the device's 64 MiB and that
# every requirement of the wheels is carried or on the device (device-packages.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=.gpu
LIMIT=$((64 * 1024 * 1024))
PYTHON=${PYTHON:-python3}
MIRROR=/work/.mirror/facebookresearch+detectron2/repo
GITHUB=https://github.com/facebookresearch/detectron2.git
# Built here (pure Python, no wheel on PyPI): the versions the project is tested with.
BUILT=(fvcore==0.1.5.post20221221 iopath==0.1.9 antlr4-python3-runtime==4.9.3)
# Downloaded as wheels for the device's Python 3.12 on x86-64 Linux.
BINARY=(pycocotools==2.0.11 yacs==0.1.8 omegaconf==2.3.1 hydra-core==1.3.8 termcolor==3.3.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

die() {
    echo "prepare.sh: $*" >&2
    exit 2
}

commit=$(sed -n 's/^PINNED_COMMIT = "\([0-9a-f]\{40\}\)".*/\1/p' alrp_d2/install_detectron2.py)
[ -n "$commit" ] || die "no PINNED_COMMIT = \"<40 hex digits>\" in alrp_d2/install_detectron2.py"

# The folder must never be committed: .gitignore has it; a clone without that line gets
# it in .git/info/exclude.
if git rev-parse --git-dir >/dev/null 2>&1 && ! git check-ignore -q "$CARRY/x"; then
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    echo "/$CARRY/" >>"$exclude"
fi
# Everything is gathered in a staging folder that replaces $CARRY at the end: a failed run
# leaves an earlier $CARRY as it was.
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/alrp-gpu-prepare.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/wheels"

# --- Detectron2's source at the pinned commit ---------------------------------------------
source=${1:-${DETECTRON2_SOURCE:-}}
archive_from_git() {  # repository
    git -C "$1" cat-file -e "$commit^{commit}" 2>/dev/null ||
        die "$1 does not hold commit $commit (git -C $1 fetch origin $commit, or give another source)"
    git -C "$1" archive --format=tar.gz --prefix=detectron2/ "$commit" >"$STAGE/detectron2.tar.gz"
}
if [ -z "$source" ] && [ -d "$MIRROR" ]; then
    source=$MIRROR
fi
if [ -n "$source" ]; then
    if [ -f "$source" ]; then
        # A tarball: git archive's records its commit; one that records another is refused.
        found=$(gzip -dc "$source" | git get-tar-commit-id 2>/dev/null || true)
        [ -z "$found" ] || [ "$found" = "$commit" ] || die "$source holds commit $found, not the pinned $commit"
        [ -n "$found" ] || echo "warning: $source records no commit; taken to be $commit" >&2
        top=$( (tar tzf "$source" 2>/dev/null || true) | head -1 | cut -d/ -f1)
        tar tzf "$source" "$top/setup.py" >/dev/null 2>&1 || die "$source holds no $top/setup.py: not Detectron2's source"
        if [ "$top" = detectron2 ]; then
            cp "$source" "$STAGE/detectron2.tar.gz"
        else  # run.sh expects detectron2/ at the top
            tmp=$(mktemp -d)
            tar xzf "$source" -C "$tmp" && mv "$tmp/$top" "$tmp/detectron2"
            tar czf "$STAGE/detectron2.tar.gz" -C "$tmp" detectron2
            rm -rf "$tmp"
        fi
    elif git -C "$source" rev-parse --git-dir >/dev/null 2>&1; then
        archive_from_git "$source"
    else
        die "DETECTRON2_SOURCE=$source is neither a git repository nor a .tar.gz"
    fi
else
    echo "no Detectron2 source given and no mirror at $MIRROR: fetching commit $commit from $GITHUB"
    tmp=$(mktemp -d)
    git -C "$tmp" init -q
    if ! timeout 120 git -C "$tmp" fetch -q --depth 1 "$GITHUB" "$commit"; then
        rm -rf "$tmp"
        die "Detectron2's source not found. Give a clone holding commit $commit or a .tar.gz of it:
    git clone $GITHUB /tmp/detectron2 && bash benchmarks/gpu/prepare.sh /tmp/detectron2
(or DETECTRON2_SOURCE=PATH bash benchmarks/gpu/prepare.sh)"
    fi
    archive_from_git "$tmp"
    rm -rf "$tmp"
fi
echo "$commit" >"$STAGE/detectron2.commit"
echo "detectron2 $commit: $CARRY/detectron2.tar.gz ($(du -h "$STAGE/detectron2.tar.gz" | cut -f1))"

# --- wheels for Python 3.12 -------------------------------------------------------------------
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
"$PYTHON" -m pip wheel -q --no-deps -w "$STAGE/wheels" "${BUILT[@]}" 2>&1 | quiet
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -d "$STAGE/wheels" "${BINARY[@]}" 2>&1 | quiet
for spec in "${BUILT[@]}" "${BINARY[@]}"; do
    name=${spec%%==*}
    ls "$STAGE/wheels/$(echo "$name" | tr - _)"-*.whl >/dev/null 2>&1 ||
        ls "$STAGE/wheels/$name"-*.whl >/dev/null 2>&1 || die "no wheel of $spec in $STAGE/wheels"
done
for w in "$STAGE"/wheels/*.whl; do  # built here: must not be tied to this Python
    case $w in
        *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-*.whl) ;;
        *) die "$w cannot install on the device's Python 3.12" ;;
    esac
done

# --- every requirement carried or on the device ------------------------------------------------
"$PYTHON" - "$STAGE" <<'EOF'
import glob, os, re, sys, tarfile, tomllib, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

carry = sys.argv[1]
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
with open("benchmarks/gpu/device-packages.txt") as f:
    device = {canonicalize_name(l.strip()) for l in f if l.strip() and not l.startswith("#")}
carried, needs = set(), []
for wheel in glob.glob(os.path.join(carry, "wheels", "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    carried.add(canonicalize_name(re.search(r"^Name: (.+)$", meta, re.M).group(1).strip()))
    needs += [(os.path.basename(wheel), r) for r in re.findall(r"^Requires-Dist: (.+)$", meta, re.M)]
with tarfile.open(os.path.join(carry, "detectron2.tar.gz")) as t:
    setup = t.extractfile("detectron2/setup.py").read().decode()
block = re.search(r"install_requires=\[(.*?)\n\s*\]", setup, re.S).group(1)
needs += [("detectron2", r) for r in re.findall(r'^\s*"([^"]+)"', block, re.M)]
with open("pyproject.toml", "rb") as f:
    needs += [("alrp-d2", r) for r in tomllib.load(f)["project"]["dependencies"]]
# Detectron2 imports black only in LazyConfig.save (no config of this project is saved so).
unneeded = {"black"}
missing = []
for who, text in needs:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate(env):
        continue
    name = canonicalize_name(req.name)
    if name not in carried | device | unneeded:
        missing.append(f"{req} (needed by {who})")
if missing:
    sys.exit("prepare.sh: neither carried nor on the device: " + "; ".join(missing))
print(f"requirements: every one of {len(needs)} carried ({len(carried)} wheels) or on the device")
EOF

# --- in place ---------------------------------------------------------------------------------
rm -rf "$CARRY"
mkdir -p "$(dirname "$CARRY")"
mv "$STAGE" "$CARRY"
chmod 755 "$CARRY"
trap - EXIT

# --- sizes: what travels must fit in 64 MiB ----------------------------------------------------
carry_bytes=$(du -sb "$CARRY" | cut -f1)
# The working tree that travels: tracked and untracked-not-ignored files (a deleted one: none).
tree_bytes=$( (git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null || true) | tail -1 | cut -f1)
total=$((carry_bytes + ${tree_bytes:-0}))
awk -v c="$carry_bytes" -v t="${tree_bytes:-0}" -v d="$CARRY" 'BEGIN { m = 1048576;
    printf "sizes: %s carried %.1f MiB + working tree %.1f MiB = %.1f MiB (limit 64 MiB)\n", d, c / m, t / m, (c + t) / m }'
[ "$total" -le "$LIMIT" ] || die "over the device's 64 MiB: leave large untracked files out of the tree"
ls -l "$CARRY" "$CARRY/wheels"

cat <<EOF

Ready. On a lent device, one call (the script keeps within 8 minutes and writes under \$OUT):
  carry:     [".gpu"]
  command:   bash benchmarks/gpu/run.sh
  timeout_s: 600
The report comes back as report.md and report.json (with run.log, build.log, build.json,
quickstart.log) among the call's files.
EOF
