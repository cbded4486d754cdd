# Site settings for launch_slurm/*.sh: copy, edit for your cluster, and point SITE_ENV at the copy:
#
#   cp launch_slurm/site_env.example.sh ~/slipform_site_env.sh   # edit it
#   SITE_ENV=~/slipform_site_env.sh TRAIN_DATA=... sbatch launch_slurm/pretrain.sh
#
# The launchers source this file in the batch shell before srun/torchrun, so everything exported here reaches
# every rank. Nothing in it is needed on CPU. Values below are examples: ask your admins, or read
# `ibv_devinfo`, `ip -br link` and your provider's NCCL guide. Uncomment only what applies.
# shellcheck shell=bash

# ---- software environment ----------------------------------------------------------------------------------
# module load cuda/12.4 nccl/2.21            # site modules, if any
# source /path/to/venv/bin/activate          # or set PYTHON=/path/to/venv/bin/python when submitting
# export HF_HOME=/scratch/$USER/hf           # caches on a fast shared or local filesystem, not $HOME
# export TMPDIR=/local/$USER/tmp

# ---- NCCL: which network, and how loudly ----------------------------------------------------------------------
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                     # INFO once to check which transport NCCL picked
# export NCCL_DEBUG_SUBSYS=INIT,NET
# export NCCL_SOCKET_IFNAME=ib0                           # bootstrap/TCP interface (not docker0/lo); "^lo,docker" excludes
# export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME           # gloo (CPU groups, object broadcasts) on the same interface

# InfiniBand / RoCE
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3          # the HCAs wired to the GPUs
# export NCCL_IB_GID_INDEX=3                              # RoCE v2 usually needs the GID index
# export NCCL_IB_TIMEOUT=22
# export NCCL_NET_GDR_LEVEL=PHB                           # GPUDirect RDMA when NIC and GPU share a PCIe switch
# export NCCL_IB_DISABLE=1                                # Ethernet-only clusters: TCP sockets

# AWS EFA (p4d/p5)
# export FI_PROVIDER=efa
# export FI_EFA_USE_DEVICE_RDMA=1
# export NCCL_PROTO=simple

# ---- failure behaviour --------------------------------------------------------------------------------------------
# A dead peer should fail the job (so Slurm can requeue it) instead of hanging every rank until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# export TORCH_NCCL_BLOCKING_WAIT=1                       # stricter, slower; with a short timeout when debugging hangs
# export TORCH_DISTRIBUTED_DEBUG=DETAIL                   # unused-parameter and collective-mismatch reports
# export NCCL_TIMEOUT=1800

# ---- CPU threads ----------------------------------------------------------------------------------------------
# pretrain.sh sets OMP_NUM_THREADS=SLURM_CPUS_PER_TASK on CPU runs; on GPU runs, keep data loader workers from
# oversubscribing cores:
# export OMP_NUM_THREADS=1
