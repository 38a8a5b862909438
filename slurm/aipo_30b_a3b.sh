#!/bin/bash
# AIPO rounds (export -> sample -> reward -> pairs -> train, resumable) for Qwen3-30B-A3B (mixture of experts, 128 experts top-8).
# 1 node x 8 H100-80GB: tp=4 pp=2 vpp=4 dp=1 ep=4 (docs/planner.md).
#
# Submit from the repository root (arguments after the script are more key=value overrides):
#   sbatch slurm/aipo_30b_a3b.sh
#   sbatch --time=12:00:00 slurm/aipo_30b_a3b.sh        # sizes: sbatch flags override the #SBATCH lines
#   RUN_DIR=/scratch/$USER/aipo_30b_a3b AIPO_ARGS="rounds.num_rounds=5" sbatch slurm/aipo_30b_a3b.sh
# Environment (all optional; slurm/common.sh documents each): RECIPE (default configs/recipes/aipo_qwen3_30b_a3b.yaml),
# RUN_DIR (default runs/aipo_30b_a3b), AIPO_SETUP, AIPO_VENV, AIPO_PYTHON, NODES, GPUS_PER_NODE, AIPO_ARGS, AIPO_SRUN_ARGS, AIPO_REQUEUE.
# 900 s before the time limit (or on `scancel --batch --signal=USR1 JOBID`) the run saves, stops
# and requeues itself; the requeued job resumes where it stopped.
#SBATCH --job-name=aipo-30b-a3b
#SBATCH --nodes=1
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
RECIPE=${RECIPE:-configs/recipes/aipo_qwen3_30b_a3b.yaml}
AIPO_ROOT=${AIPO_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[ -f "$AIPO_ROOT/slurm/common.sh" ] || { echo "error: no $AIPO_ROOT/slurm/common.sh: submit from the repository root or set AIPO_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$AIPO_ROOT/slurm/common.sh"
aipo_setup aipo_30b_a3b
aipo_run_rounds "$@"  # script arguments: more key=value overrides
