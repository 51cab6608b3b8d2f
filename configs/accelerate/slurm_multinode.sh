#!/usr/bin/env bash
# Multi-node DDP with SLURM: 2 nodes x 8 GPUs.  sbatch configs/accelerate/slurm_multinode.sh configs/llava15_7b_coco.yaml
#SBATCH --job-name=structlora
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
set -euo pipefail
CONFIG=${1:?usage: sbatch slurm_multinode.sh CONFIG [--set key=value ...]}
shift
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  -m pipeline.cli run "$CONFIG" "$@"
