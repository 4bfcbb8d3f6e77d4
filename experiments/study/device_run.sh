#!/usr/bin/env bash
# The issue-19/20 runs on a GPU machine with many cores, in one call:
#   MODE=smoke  bash experiments/study/device_run.sh   # GPU check, timings, 2-round smoke of every suite
#   MODE=full   bash experiments/study/device_run.sh   # the studies (resumable; stops at $BUDGET s)
#   MODE=grid SETTING=beijing bash experiments/study/device_run.sh   # one setting's grid, selection, 5 seeds (CPU)
#   MODE=more bash experiments/study/device_run.sh   # depth + heterophily (3 seeds), issue 16's baselines on
#                                                    # CIFAR-10 Dir 0.1 (GPU), Los-loop phase C (CPU); resumable
# Expects the datasets under .devdata/ (copied there from ../shared/datasets) and writes one
# tarball of experiments/results/study and experiments/results/cifar10_paper to $OUT.
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
START=$SECONDS
BUDGET=${BUDGET:-500}
left() { echo $((BUDGET - (SECONDS - START))); }
mkdir -p ../shared/datasets
# datasets may also come packed (.devpack/<name>.tgz), to keep the copied tree small
for t in .devpack/*.tgz; do [ -f "$t" ] && mkdir -p .devdata && tar xzf "$t" -C .devdata; done
for d in .devdata*/*; do ln -sfn "$PWD/$d" "../shared/datasets/$(basename "$d")"; done
SHN="python3 -m shn.cli --threads 1"
pack() { tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.pt.tmp' experiments/results/study experiments/results/cifar10_paper 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch,sys;print(sys.version, torch.__version__, torch.cuda.get_device_name(0), torch.get_num_threads())" | tee -a "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"

if [ "${MODE:-smoke}" = smoke ]; then
  python3 experiments/gpu_check.py --cifar .devdata/cifar10_jpeg --out "$OUT/gpu_check.json" --threads 2 > "$OUT/gpu_check.log" 2>&1 &
  GC=$!
  ( time $SHN run experiments/configs/cifar10_paper.toml --set device='"cuda"' --set rounds=6 --set eval_every=3 \
      --out /tmp/smoke/paper --no-progress ) > "$OUT/smoke_paper.log" 2>&1 &
  ( time $SHN run experiments/configs/traffic_losloop.toml --set rounds=6 --set eval_every=3 --set local.steps=20 \
      --out /tmp/smoke/los --no-progress ) > "$OUT/smoke_los.log" 2>&1 &
  $SHN suite experiments/study/cifar10_dir.toml --jobs 7 --set device='"cuda"' --set rounds=2 --set graph.stage1_rounds=1 \
      --set eval_every=1 --set checkpoint_every=1 --only seed0 --out /tmp/smoke/cifar --no-progress > "$OUT/smoke_cifar.log" 2>&1
  $SHN suite experiments/study/losloop_grid.toml --jobs 6 --set rounds=2 --set eval_every=1 --only @sgd-0.01 --only @local-0.01 \
      --out /tmp/smoke/losgrid --no-progress > "$OUT/smoke_losgrid.log" 2>&1
  wait
  cp /tmp/smoke/paper/summary.json "$OUT/smoke_paper_summary.json" 2>/dev/null
  tail -5 "$OUT"/*.log
  exit 0
fi

if [ "${MODE:-smoke}" = grid ]; then
  S=${SETTING:?}
  mkdir -p experiments/results/study
  ( timeout $(( $(left) - 15 )) $SHN suite experiments/study/${S}_grid.toml --jobs ${CPU_JOBS:-16} --no-progress \
      && python3 experiments/study/choose_trials.py $S \
      && timeout $(( $(left) - 15 )) $SHN suite experiments/study/${S}_tuned.toml --jobs ${CPU_JOBS:-16} --no-progress ) \
      > "$OUT/${S}_study.log" 2>&1
  cp experiments/study/${S}_tuned.toml "$OUT/" 2>/dev/null
  tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.pt.tmp' experiments/results/study/${S}-grid experiments/results/study/${S} 2>/dev/null
  tail -n 3 "$OUT/${S}_study.log"
  exit 0
fi

if [ "${MODE:-smoke}" = more ]; then
  pids=()
  timeout $(( $(left) - 25 )) $SHN suite experiments/study/cifar10_dir.toml --jobs ${DIR_JOBS:-5} --set device='"cuda"' \
     --only /fedprox --only /ditto --only /fedrep --no-progress > "$OUT/dir_baselines.log" 2>&1 &
  pids+=($!)
  timeout $(( $(left) - 25 )) $SHN suite experiments/study/depth_heterophily.toml --jobs ${DH_JOBS:-6} \
     --set device='"cuda"' --no-progress > "$OUT/depth_heterophily.log" 2>&1 &
  pids+=($!)
  timeout $(( $(left) - 25 )) $SHN suite experiments/study/losloop_phasec.toml --jobs ${CPU_JOBS:-5} \
     --no-progress > "$OUT/losloop_phasec.log" 2>&1 &
  pids+=($!)
  alive() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
  while [ "$(left)" -gt 20 ] && alive; do sleep 5; done
  sleep 2
  tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.pt.tmp' experiments/results/study 2>/dev/null
  tail -n 4 "$OUT"/*.log; ls -la "$OUT"
  exit 0
fi

# full: the GPU studies and the CPU studies side by side
pids=()
python3 experiments/gpu_check.py --cifar .devdata/cifar10_jpeg --out "$OUT/gpu_check.json" --threads 1 > "$OUT/gpu_check.log" 2>&1 &
if [ ! -f experiments/results/cifar10_paper/pfedhn/seed0/summary.json ]; then
  timeout $(( $(left) - 25 )) $SHN run experiments/configs/cifar10_paper.toml --set device='"cuda"' \
     --out experiments/results/cifar10_paper/pfedhn/seed0 --resume --no-progress > "$OUT/paper.log" 2>&1 &
  pids+=($!)
fi
timeout $(( $(left) - 25 )) $SHN suite experiments/study/cifar10_dir.toml --jobs ${GPU_JOBS:-7} --set device='"cuda"' \
   --no-progress > "$OUT/cifar_study.log" 2>&1 &
pids+=($!)
( timeout $(( $(left) - 25 )) $SHN suite experiments/study/losloop_grid.toml --jobs ${CPU_JOBS:-8} --no-progress \
    && python3 experiments/study/choose_trials.py losloop \
    && timeout $(( $(left) - 25 )) $SHN suite experiments/study/losloop_tuned.toml --jobs ${CPU_JOBS:-8} --no-progress ) \
    > "$OUT/losloop_study.log" 2>&1 &
pids+=($!)
alive() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while [ "$(left)" -gt 20 ] && alive; do sleep 5; done
sleep 1
cp experiments/study/losloop_tuned.toml "$OUT/" 2>/dev/null
pack
ls -la "$OUT"
