#!/usr/bin/env bash
# The embedded default run (`python -m spo_fast.train`, training + evaluation), timed side by side: an old commit
# and the current checkout, one after the other on this machine (machines of one kind differ by 2x or more, so
# only a ratio measured side by side on one machine means anything).
#
#   bash benchmarks/toy_side_by_side.sh [OLD_COMMIT=a5b6ee8] [OUTDIR=outputs/side_by_side]
#
# The old commit runs from a git worktree with its own shipped toy-world assets. It is imported through a folder
# that holds only a link to its `spo_fast/` (PYTHONPATH, and the working directory of its run), so none of its other
# root folders is ever on sys.path: commits before the package layout had a root `kernels/` package that shadows
# Hugging Face's `kernels` (and installed it, with `configs/`, inside `spo_fast` by setup.py's package_dir: linked
# here for those commits).
# Nothing else should run meanwhile. Both runs get the caller's environment, as `python -m spo_fast.train` does:
# OMP_WAIT_POLICY is not set here (PASSIVE made the toy UNet's bf16 forward 1.2x slower on the 2-core machine,
# 216 -> 264 ms at batch 64; set it yourself on a shared machine and compare only runs made with the same setting).
# The new run starts with an empty base-evaluation cache (spo_fast.evaluation.base_cache; SPO_FAST_CACHE=OUTDIR/cache):
# it is timed as a machine's first run, which samples the base's half of the evaluation itself.
# Writes OUTDIR/side_by_side.json: both wall times, the ratio, both eval.json summaries, the CPU's vector
# capability and whether it computes bf16 natively (the toy recipes sample in bf16 only then).
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
OLD=${1:-a5b6ee8}
OUT=$(realpath -m "${2:-outputs/side_by_side}")
REPO=$(git rev-parse --show-toplevel)
if ! git -C "$REPO" rev-parse --verify --quiet "$OLD^{commit}" >/dev/null; then
  echo "error: OLD_COMMIT '$OLD' is not a commit of this repository (e.g. a5b6ee8; --help for usage)" >&2
  exit 2
fi
NEW=$(git -C "$REPO" rev-parse --short HEAD)
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
WT=$(mktemp -d /tmp/spo_fast_old.XXXXXX)
trap 'rm -rf "$WT.path"; git -C "$REPO" worktree remove --force "$WT" >/dev/null 2>&1 || rm -rf "$WT"' EXIT
git -C "$REPO" worktree add --detach "$WT" "$OLD" >/dev/null
for d in kernels configs; do  # the old layout: root folders installed inside spo_fast
  [[ -e "$WT/spo_fast/$d" ]] || ln -s "../$d" "$WT/spo_fast/$d"
done
mkdir "$WT.path" && ln -s "$WT/spo_fast" "$WT.path/spo_fast"

run() {  # name dir pythonpath
  local name=$1 dir=$2 pp=$3 t0 t1
  rm -rf "$OUT/$name" "$OUT/cache"
  t0=$(date +%s.%N)
  (cd "$dir" && PYTHONPATH="$pp" SPO_FAST_CACHE="$OUT/cache" python -m spo_fast.train log.output_dir="$OUT/$name" \
     log.progress=false > "$OUT/$name.log" 2>&1)
  t1=$(date +%s.%N)
  python -c "print(round($t1 - $t0, 1))"
}
echo "[side by side] old $OLD ..."
T_OLD=$(run old "$WT.path" "$WT.path")
echo "[side by side] old: $T_OLD s; new $NEW ..."
T_NEW=$(run new "$REPO" "")  # the installed (editable) checkout
echo "[side by side] new: $T_NEW s"
python - "$OUT" "$OLD" "$NEW" "$T_OLD" "$T_NEW" <<'EOF'
import json, os, platform, sys
from pathlib import Path
out, old, new, t_old, t_new = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
def summary(name):
    f = out / name / "eval.json"
    if not f.is_file():
        return None
    e = json.loads(f.read_text())
    return {k: e.get(k) for k in ("reward_base", "reward_trained", "margin", "win_rate", "reward_base_seed_spread",
                                  "base_cache") if k in e}
import torch
from spo_fast.core.config import native_bf16
res = {"old_commit": old, "new_commit": new, "old_wall_s": t_old, "new_wall_s": t_new,
       "speedup": round(t_old / t_new, 3), "machine": platform.processor() or platform.machine(),
       "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
       "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16("cpu"),
       "old_eval": summary("old"), "new_eval": summary("new")}
(out / "side_by_side.json").write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(res, indent=1))
EOF
