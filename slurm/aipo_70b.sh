#!/bin/bash
# AIPO rounds (export -> sample -> reward -> pairs -> train, resumable) for Llama-3-70B-Instruct.
# 4 nodes x 8 H100-80GB (tp=8 inside a node; the recipe sets the layout).
#
# Submit from the repository root (arguments after the script are more key=value overrides):
#   sbatch slurm/aipo_70b.sh
#   sbatch --nodes=8 --time=12:00:00 slurm/aipo_70b.sh        # sizes: sbatch flags override the #SBATCH lines
#   RUN_DIR=/scratch/$USER/aipo-70b AIPO_ARGS="rounds.num_rounds=5" sbatch slurm/aipo_70b.sh
# Environment (all optional; slurm/common.sh documents each): RECIPE (default configs/recipes/aipo_llama3_70b.yaml),
# RUN_DIR (default runs/aipo_70b), AIPO_SETUP, AIPO_VENV, AIPO_PYTHON, NODES, GPUS_PER_NODE, AIPO_ARGS, AIPO_SRUN_ARGS, AIPO_REQUEUE.
# 600 s before the time limit (or on `scancel --batch --signal=USR1 JOBID`) the run saves, stops
# and requeues itself; the requeued job resumes where it stopped.
#SBATCH --job-name=aipo-70b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0                # all of each node's memory (steps share it; vLLM and the trainer size themselves)
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
RECIPE=${RECIPE:-configs/recipes/aipo_llama3_70b.yaml}
AIPO_ROOT=${AIPO_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[ -f "$AIPO_ROOT/slurm/common.sh" ] || { echo "error: no $AIPO_ROOT/slurm/common.sh: submit from the repository root or set AIPO_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$AIPO_ROOT/slurm/common.sh"
aipo_setup aipo_70b
aipo_run_rounds "$@"  # script arguments: more key=value overrides
