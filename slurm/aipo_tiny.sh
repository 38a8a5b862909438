#!/bin/bash
# AIPO rounds on a tiny model, CPU only: 2 ranks (gloo), no GPUs, on 1 node or on 2 (one rank each:
# `sbatch --nodes=2`, then sampling/reward replicas spread one per node and training spans both).
# What the tests submit to a two-node Slurm cluster on localhost (tests/test_slurm.py); also a quick
# check of a real cluster:
#   sbatch slurm/aipo_tiny.sh
#   sbatch --nodes=2 slurm/aipo_tiny.sh sampling.replicas=2 reward.replicas=2
#   RUN_DIR=/tmp/aipo_tiny AIPO_ARGS="model.path=/path/to/tiny_hf rounds.prompts=/path/prompts.jsonl" sbatch slurm/aipo_tiny.sh
# Environment (all optional; slurm/common.sh documents each): RECIPE (default
# configs/recipes/aipo_tiny.yaml), RUN_DIR (default runs/aipo_tiny), AIPO_SETUP, AIPO_VENV, AIPO_PYTHON,
# AIPO_ARGS, AIPO_SRUN_ARGS, AIPO_REQUEUE. Ranks per node (GPUS_PER_NODE) follow the allocation.
#SBATCH --job-name=aipo-tiny
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
RECIPE=${RECIPE:-configs/recipes/aipo_tiny.yaml}
AIPO_ROOT=${AIPO_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[ -f "$AIPO_ROOT/slurm/common.sh" ] || { echo "error: no $AIPO_ROOT/slurm/common.sh: submit from the repository root or set AIPO_ROOT" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$AIPO_ROOT/slurm/common.sh"
aipo_setup aipo_tiny
aipo_run_rounds "$@"  # script arguments: more key=value overrides
