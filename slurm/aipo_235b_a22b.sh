#!/bin/bash
# AIPO rounds (export -> sample -> reward -> pairs -> train, resumable) for Qwen3-235B-A22B (mixture of experts, 128 experts top-8).
# 16 nodes x 8 H100-80GB: tp=4 pp=1 dp=32 ep=128 (docs/planner.md); 8 nodes x 8 H200-141GB: tp=4 pp=2 dp=8 ep=32.
#
# Submit from the repository root (arguments after the script are more key=value overrides):
#   sbatch slurm/aipo_235b_a22b.sh
#   RECIPE=configs/recipes/aipo_qwen3_235b_a22b_h200.yaml sbatch --nodes=8 slurm/aipo_235b_a22b.sh   # H200-141GB nodes
#   RUN_DIR=/scratch/$USER/aipo_235b_a22b AIPO_ARGS="rounds.num_rounds=5" sbatch slurm/aipo_235b_a22b.sh
# Environment (all optional; slurm/common.sh documents each): RECIPE (default configs/recipes/aipo_qwen3_235b_a22b.yaml),
# RUN_DIR (default runs/aipo_235b_a22b), AIPO_SETUP, AIPO_VENV, AIPO_PYTHON, NODES, GPUS_PER_NODE, AIPO_ARGS, AIPO_SRUN_ARGS, AIPO_REQUEUE.
# 900 s before the time limit (or on `scancel --batch --signal=USR1 JOBID`) the run saves, stops
# and requeues itself; the requeued job resumes where it stopped.
#SBATCH --job-name=aipo-235b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0                # all of each node's memory (steps share it; vLLM and the trainer size themselves)
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
RECIPE=${RECIPE:-configs/recipes/aipo_qwen3_235b_a22b.yaml}
AIPO_ROOT=${AIPO_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[ -f "$AIPO_ROOT/slurm/common.sh" ] || { echo "error: no $AIPO_ROOT/slurm/common.sh: submit from the repository root or set AIPO_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$AIPO_ROOT/slurm/common.sh"
aipo_setup aipo_235b_a22b
aipo_run_rounds "$@"  # script arguments: more key=value overrides
