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
# to train.py as they are. It runs from the caller's directory (the yaml and train.py are found next to this
# script), so relative paths resolve there, as for `python train.py`. Misuse is one line and exit 1 before anything
# starts, as is an `accelerate` that is not on PATH or cannot run (activate the venv first). RM_DRY_RUN=1 prints
# the command instead of running it. --help prints this text.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0
fi

ZERO_STAGE=${1:-3}
NUM_NODES=${2:-1}
GPUS_PER_NODE=${3:-4}
MASTER_ADDR=${4:-localhost}
MASTER_PORT=${5:-29500}
shift $(( $# < 5 ? $# : 5 ))
NODE_RANK=${NODE_RANK:-0}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)  # where the yamls, rm/ and train.py are; no cd: see above

fail() { echo "error: $*" >&2; exit 1; }
[[ "$ZERO_STAGE" =~ ^[123]$ ]] || fail "zero_stage must be 1, 2 or 3, got '$ZERO_STAGE' (usage: bash $0" \
    "[zero_stage 1|2|3] [num_nodes] [gpus_per_node] [master_addr] [master_port] [train.py args...])"
# whole numbers of at most 9 digits (nodes x GPUs stays within bash's integers), read in base 10 (08 is 8)
is_count() { [[ "$2" =~ ^[0-9]{1,9}$ ]] && (( 10#$2 >= $1 )); }
is_count 1 "$NUM_NODES" || fail "num_nodes must be a positive integer (at most 9 digits), got '$NUM_NODES'"
is_count 1 "$GPUS_PER_NODE" ||
    fail "gpus_per_node must be a positive integer (at most 9 digits), got '$GPUS_PER_NODE'"
is_count 1 "$MASTER_PORT" && (( 10#$MASTER_PORT <= 65535 )) ||
    fail "master_port must be a port 1..65535, got '$MASTER_PORT'"
NUM_NODES=$((10#$NUM_NODES)) GPUS_PER_NODE=$((10#$GPUS_PER_NODE)) MASTER_PORT=$((10#$MASTER_PORT))
is_count 0 "$NODE_RANK" && (( 10#$NODE_RANK < NUM_NODES )) ||
    fail "NODE_RANK must be a node rank 0..$((NUM_NODES - 1)) for $NUM_NODES node(s), got '$NODE_RANK'"
NODE_RANK=$((10#$NODE_RANK))

TOPOLOGY=$([ "$NUM_NODES" -eq 1 ] && echo 1node || echo 2node)
CONFIG_FILE=$REPO/accelerate_configs/zero${ZERO_STAGE}_${TOPOLOGY}.yaml
[ -f "$CONFIG_FILE" ] ||
    fail "accelerate config $CONFIG_FILE not found (needed for ZeRO-$ZERO_STAGE on $NUM_NODES node(s))"
WORLD_SIZE=$((NUM_NODES * GPUS_PER_NODE))

# `accelerate` must be on PATH and able to run (its python must find accelerate and torch), or the launch would
# fail only after the banner. Its python runs the check below too, so both see the same installation.
ACCELERATE=$(command -v accelerate || true)
if [ -z "$ACCELERATE" ]; then
    if [ -x "$REPO/.venv/bin/accelerate" ]; then
        fail "accelerate is not on PATH; activate the venv first: source $REPO/.venv/bin/activate"
    fi
    fail "accelerate is not on PATH; install the requirements into a venv and activate it:" \
        "python3 -m venv .venv && .venv/bin/pip install -r $REPO/requirements.txt && source .venv/bin/activate"
fi
read -r SHEBANG < "$ACCELERATE" || true
read -r -a INTERPRETER <<< "${SHEBANG#\#!}"
PYTHON=${INTERPRETER[0]:-python3}
[[ "$PYTHON" == */env ]] && PYTHON=${INTERPRETER[1]:-python3}
"$PYTHON" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("accelerate") and u.find_spec("torch")))' \
    2> /dev/null ||
    fail "$ACCELERATE cannot run: its python ($PYTHON) lacks accelerate or torch; activate the venv that" \
        "has the requirements (source $REPO/.venv/bin/activate) or reinstall them there (pip install -r" \
        "$REPO/requirements.txt)"

# The yaml is read by accelerate before train.py runs: check it against this topology first (and, on a worker
# node, that the master answers) so a mistake costs seconds, not a hung or silently wrong launch. rm.validate
# prints its own one-line errors.
CHECK=("$PYTHON" -m rm.validate --accelerate_config "$CONFIG_FILE" --num_machines "$NUM_NODES"
       --num_processes "$WORLD_SIZE" --gpus_per_node "$GPUS_PER_NODE")
if (( NODE_RANK > 0 )); then
    CHECK+=(--machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
fi
(cd "$REPO" && "${CHECK[@]}") || exit 1

TRAIN_ARGS=()
add_flag() { [ -n "${2:-}" ] && TRAIN_ARGS+=("--$1" "$2") || true; }
add_flag model_name_or_path "${MODEL_PATH:-}"
add_flag tokenizer_name_or_path "${TOKENIZER_PATH:-}"
add_flag train_file_dir "${TRAIN_FILE_DIR:-}"
add_flag validation_file_dir "${VALID_FILE_DIR:-}"
add_flag output_dir "${OUTPUT_DIR:-}"
add_flag cache_dir "${CACHE_DIR:-}"

# What train.py will use for a setting, for the banner: the last --NAME among its arguments (the environment's come
# first, so an explicit argument wins, as in train.py's parser), else a --config file may set it, else rm/config.py's
# default. Nothing is checked here: train.py does that.
ALL_ARGS=("${TRAIN_ARGS[@]}" "$@")
shown() {
    local name=$1 dashed=${1//_/-} found=0 value="" config="" i
    for ((i = 0; i < ${#ALL_ARGS[@]}; i++)); do
        case "${ALL_ARGS[i]}" in
            "--$name"|"--$dashed") found=1; value=${ALL_ARGS[i + 1]-}; i=$((i + 1)) ;;
            "--$name="*|"--$dashed="*) found=1; value=${ALL_ARGS[i]#*=} ;;
            --config) config=${ALL_ARGS[i + 1]-}; i=$((i + 1)) ;;
            --config=*) config=${ALL_ARGS[i]#*=} ;;
        esac
    done
    if (( found )); then echo "$value"
    elif [ -n "$config" ]; then echo "(--config $config's $name if it sets one, else rm/config.py default)"
    else echo "(rm/config.py default)"; fi
}

cat <<INFO
==================== reward-model training ====================
ZeRO stage:      $ZERO_STAGE
nodes:           $NUM_NODES
GPUs per node:   $GPUS_PER_NODE
world size:      $WORLD_SIZE
node rank:       $NODE_RANK
master:          $MASTER_ADDR:$MASTER_PORT
config:          $CONFIG_FILE
model:           $(shown model_name_or_path)
output dir:      $(shown output_dir)
working dir:     $PWD (relative paths resolve here)
===============================================================
INFO

COMMAND=(accelerate launch --config_file "$CONFIG_FILE"
    --num_machines "$NUM_NODES" --machine_rank "$NODE_RANK"
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
    --num_processes "$WORLD_SIZE"
    "$REPO/train.py" "${TRAIN_ARGS[@]}" "$@")
if [ "${RM_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${COMMAND[@]}"; echo
    exit 0
fi
exec "${COMMAND[@]}"
