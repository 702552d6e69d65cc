#!/usr/bin/env bash
# Multi-node, multi-GPU reward-model training with DeepSpeed ZeRO, the interface of the original torchrun scripts.
#
#   bash torchrun_multi_node_multi_gpu.sh [zero_stage] [num_nodes] [gpus_per_node] [master_addr] [master_port] [train.py args...]
#   defaults: 3 1 4 localhost 29500; NODE_RANK from the environment (default 0)
#
# Example 1, one node with 4 GPUs, ZeRO-3:     bash torchrun_multi_node_multi_gpu.sh 3 1 4 localhost 29500
# Example 2, two nodes with 4 GPUs, ZeRO-3:    NODE_RANK=0 bash torchrun_multi_node_multi_gpu.sh 3 2 4 10.0.0.1 29500
#                                   (node 2)   NODE_RANK=1 bash torchrun_multi_node_multi_gpu.sh 3 2 4 10.0.0.1 29500
#
# It runs `accelerate launch` with accelerate_configs/zero<stage>_1node.yaml (one node) or zero<stage>_2node.yaml
# (several nodes; the topology flags below give the real counts) and adds no setting of its own: DeepSpeed settings
# live in the yaml, hyperparameter defaults in rm/config.py. MODEL_PATH, TOKENIZER_PATH, TRAIN_FILE_DIR,
# VALID_FILE_DIR, OUTPUT_DIR and CACHE_DIR, when set, become the matching train.py flags; extra arguments are passed
# to train.py as they are. RM_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

ZERO_STAGE=${1:-3}
NUM_NODES=${2:-1}
GPUS_PER_NODE=${3:-4}
MASTER_ADDR=${4:-localhost}
MASTER_PORT=${5:-29500}
shift $(( $# < 5 ? $# : 5 ))
NODE_RANK=${NODE_RANK:-0}

cd "$(dirname "$0")"

if [[ ! "$ZERO_STAGE" =~ ^[123]$ ]]; then
    echo "error: zero_stage must be 1, 2 or 3, got '$ZERO_STAGE'" >&2
    echo "usage: bash $0 [zero_stage 1|2|3] [num_nodes] [gpus_per_node] [master_addr] [master_port] [train.py args...]" >&2
    exit 1
fi
for value in "$NUM_NODES" "$GPUS_PER_NODE" "$MASTER_PORT"; do
    if [[ ! "$value" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: num_nodes, gpus_per_node and master_port must be positive integers, got '$value'" >&2
        exit 1
    fi
done
if [[ ! "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NUM_NODES )); then
    echo "error: NODE_RANK=$NODE_RANK is outside 0..$((NUM_NODES - 1)) for $NUM_NODES node(s)" >&2
    exit 1
fi

TOPOLOGY=$([ "$NUM_NODES" -eq 1 ] && echo 1node || echo 2node)
CONFIG_FILE=accelerate_configs/zero${ZERO_STAGE}_${TOPOLOGY}.yaml
if [ ! -f "$CONFIG_FILE" ]; then
    echo "error: accelerate config $CONFIG_FILE not found (needed for ZeRO-$ZERO_STAGE on $NUM_NODES node(s))" >&2
    exit 1
fi
WORLD_SIZE=$((NUM_NODES * GPUS_PER_NODE))

# The yaml is read by accelerate before train.py runs: check it against this topology first (and, on a worker
# node, that the master answers) so a mistake costs seconds, not a hung or silently wrong launch.
CHECK=(python -m rm.validate --accelerate_config "$CONFIG_FILE" --num_machines "$NUM_NODES"
       --num_processes "$WORLD_SIZE" --gpus_per_node "$GPUS_PER_NODE")
if (( NODE_RANK > 0 )); then
    CHECK+=(--machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
fi
"${CHECK[@]}" || exit 1

TRAIN_ARGS=()
add_flag() { [ -n "${2:-}" ] && TRAIN_ARGS+=("--$1" "$2") || true; }
add_flag model_name_or_path "${MODEL_PATH:-}"
add_flag tokenizer_name_or_path "${TOKENIZER_PATH:-}"
add_flag train_file_dir "${TRAIN_FILE_DIR:-}"
add_flag validation_file_dir "${VALID_FILE_DIR:-}"
add_flag output_dir "${OUTPUT_DIR:-}"
add_flag cache_dir "${CACHE_DIR:-}"

cat <<INFO
==================== reward-model training ====================
ZeRO stage:      $ZERO_STAGE
nodes:           $NUM_NODES
GPUs per node:   $GPUS_PER_NODE
world size:      $WORLD_SIZE
node rank:       $NODE_RANK
master:          $MASTER_ADDR:$MASTER_PORT
config:          $CONFIG_FILE
model:           ${MODEL_PATH:-(rm/config.py default)}
output dir:      ${OUTPUT_DIR:-(rm/config.py default)}
===============================================================
INFO

COMMAND=(accelerate launch --config_file "$CONFIG_FILE"
    --num_machines "$NUM_NODES" --machine_rank "$NODE_RANK"
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
    --num_processes "$WORLD_SIZE"
    train.py "${TRAIN_ARGS[@]}" "$@")
if [ "${RM_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${COMMAND[@]}"; echo
    exit 0
fi
exec "${COMMAND[@]}"
