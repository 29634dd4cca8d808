#!/usr/bin/env bash
# Build the device kit here (where pip reaches PyPI): the cp312 manylinux wheels that the GPU check
# needs and the lent machine lacks, listed with their pins in bench/gpu_steps/kit.txt, downloaded
# with --no-deps (the list is the whole closure; tests/test_device_kit.py checks that) into the
# ignored folder bench/kit/. Then prints the kit's size (at most 48 MiB: it travels with the
# working tree, 64 MiB in all) and the one device `run` call that runs the whole check there.
#
#   bash bench/device_kit.sh            # KIT=dir to put it elsewhere (inside the repo, ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-bench/kit}
LIST=bench/gpu_steps/kit.txt
MAX_MIB=48
PIP=${PIP:-python3 -m pip}
[[ -x .venv/bin/python ]] && PIP=${PIP_OVERRIDE:-.venv/bin/python -m pip}

mkdir -p "$KIT"
rm -f "$KIT"/*.whl
# The lent machine: CPython 3.12 on x86-64 Linux (glibc manylinux); pip matches each tag exactly.
PLATFORMS=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
         manylinux_2_24 manylinux_2_17 manylinux2014 manylinux2010 manylinux1; do
    PLATFORMS+=(--platform "${p}_x86_64")
done
mapfile -t PINS < <(sed 's/#.*//; s/[[:space:]]//g; /^$/d' "$LIST")
echo "# downloading ${#PINS[@]} wheels listed in $LIST into $KIT"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none "${PLATFORMS[@]}" --platform any -d "$KIT" "${PINS[@]}" \
    2> >(grep -v "^WARNING: Location" >&2)

count=$(ls "$KIT"/*.whl | wc -l)
if ((count != ${#PINS[@]})); then
    echo "error: $count wheels in $KIT for ${#PINS[@]} pins in $LIST" >&2; exit 1
fi
bytes=$(du -cb "$KIT"/*.whl | tail -1 | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "# the 5 largest:"; ls -S "$KIT"/*.whl | head -5 | while read -r w; do du -h "$w"; done
echo "# kit: $count wheels, $mib MiB in $KIT (limit $MAX_MIB MiB)"
if ((bytes > MAX_MIB * 1048576)); then echo "error: the kit is over $MAX_MIB MiB" >&2; exit 1; fi
# What travels: the working tree (tracked and untracked-not-ignored files) plus the carried kit.
tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "# with the working tree ($(awk -v b="$tree" 'BEGIN { printf "%.1f", b / 1048576 }') MiB):" \
     "$(awk -v b="$((tree + bytes))" 'BEGIN { printf "%.1f", b / 1048576 }') MiB travel (limit 64 MiB)"
if ((tree + bytes > 64 * 1048576)); then echo "error: over the 64 MiB that may travel" >&2; exit 1; fi
cat <<RUN

# On a task that is lent a GPU, this one call runs the whole check: gpu_check.sh installs the kit
# (pip install --no-index --no-deps --target <scratch>/site $KIT/*.whl, then PYTHONPATH), runs the
# preflight and the four steps within 420 s, and leaves log.txt, results.jsonl and summary.txt in \$OUT:
run(command="bash bench/gpu_check.sh", carry=["$KIT"], timeout_s=540)
RUN
