#!/usr/bin/env bash
# The patches here on the device, from the repository root, in calls that each fit the 10-minute limit:
#   bash docs/patches/run_on_device.sh test [variant]  # each variant (or the one named) applied in turn:
#                                                      # tests/test_decode_mgpu.py -m gpu, about 170 s each
#   bash docs/patches/run_on_device.sh time128         # main and the $timed variants in one A/B at D=128
#   bash docs/patches/run_on_device.sh time256         # the same at D=256
#   bash docs/patches/run_on_device.sh sweep VARIANT   # that variant applied: decode_sweep of the Mosaic presets
#                                                      # with peers (B=32/16k, B=8/16k, B=8/128k), reverted
# A variant is a patch, or patches stacked with "+" (applied left to right). Logs under $OUT (default
# /tmp/patches); the variants' decode_mgpu.py under /tmp/patches (the A/B loads them from there).
set -u
variants="mosaic-max value-tiles-hold-the-output four-programs four-programs+qjl-keys four-programs+qjl-keys+three-bit-gather
    four-programs+qjl-keys+three-bit-gather+qjl-2bit-keys"
# the A/Bs time these (the stack's intermediate variants compile the 4-bit presets to the same machine code)
timed="mosaic-max value-tiles-hold-the-output four-programs four-programs+qjl-keys+three-bit-gather+qjl-2bit-keys"
out=${OUT:-/tmp/patches}
mkdir -p "$out" /tmp/patches
files=""
for v in $variants; do
    [ -n "${2:-}" ] && [ "$v" != "$2" ] && continue
    name=${v//[-+]/_}
    applied=""
    for p in ${v//+/ }; do
        git apply "docs/patches/$p.patch" || { echo "$p does not apply"; break; }
        applied="$p $applied"
    done
    cp tqjax/pallas/decode_mgpu.py "/tmp/patches/$name.py"
    case " $timed " in *" $v "*) files="$files,/tmp/patches/$name.py" ;; esac
    if [ "${1:-}" = test ]; then
        timeout 260 python3 -m pytest -q -m gpu tests/test_decode_mgpu.py -o addopts="" -p no:cacheprovider \
            -W ignore::DeprecationWarning > "$out/gpu_tests_$name.log" 2>&1
        echo "$v: $(tail -1 "$out/gpu_tests_$name.log")"
    fi
    for p in $applied; do git apply -R "docs/patches/$p.patch"; done
done
if [ "${1:-}" = time128 ]; then
    timeout 500 python3 -u -m experiments.mgpu_decode_compare --against "${files#,}" \
        --points 4bit_nc/32/16384,k8v4/32/16384,3bit_nc/32/16384,kqjl4v4/32/16384 > "$out/compare_d128.log" 2>&1
fi
if [ "${1:-}" = time256 ]; then
    timeout 500 python3 -u -m experiments.mgpu_decode_compare --against "${files#,}" --head-dim 256 \
        --points 4bit_nc/1/131072,4bit_nc/8/32768,3bit_nc/8/32768,k8v4/8/32768 > "$out/compare_d256.log" 2>&1
fi
if [ "${1:-}" = sweep ] && [ -n "${2:-}" ]; then
    for p in ${2//+/ }; do git apply "docs/patches/$p.patch"; done
    timeout 560 python3 -u -m experiments.decode_sweep --presets turboquant_4bit_nc turboquant_k8v4 \
        turboquant_k3v4_nc turboquant_3bit_nc turboquant_kqjl4v4 turboquant_kqjl3v4 --batch 32 8 --context 16384 131072 \
        --max-tokens 1100000 --no-store --out "$out/sweep" > "$out/sweep.log" 2>&1
    tail -40 "$out/sweep.log"
    for p in $(echo ${2//+/ } | tr ' ' '\n' | tac); do git apply -R "docs/patches/$p.patch"; done
fi
grep -h "^RESULT" "$out"/compare_d*.log 2>/dev/null | grep -v "^RESULT (" | grep -v "^RESULT preset" || true
