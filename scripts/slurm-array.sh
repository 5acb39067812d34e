#!/usr/bin/env bash
# cerebseg on a SLURM cluster as a job array: one participant per array task, then the group
# step as a job that starts when every task has ended (afterany: failed participants are listed
# in group_qc.tsv, the others are in the tables).
#
#   scripts/slurm-array.sh BIDS_DIR OUTPUT_DIR [cerebseg participant options ...]
#
# prints the two job ids and where the logs go. Settings (environment variables):
#
#   CEREBSEG        how to run cerebseg: default `cerebseg` (a pip install on PATH); with the
#                   container, e.g.
#                   CEREBSEG="singularity run --cleanenv -B /data:/data cerebseg-0.1.0.sif"
#                   (bind every folder given: BIDS_DIR, OUTPUT_DIR, WORK_DIR)
#   PARTICIPANTS    labels to run (default: every sub-* folder of BIDS_DIR)
#   WORK_DIR        work folder shared by the tasks (default: OUTPUT_DIR/../cerebseg-work);
#                   a task resubmitted with the same one resumes
#   SBATCH_ARGS     sbatch options of each participant task
#                   (default: --cpus-per-task=2 --mem=8G --time=2:00:00)
#   GROUP_SBATCH_ARGS  sbatch options of the group job (default: --cpus-per-task=1 --mem=2G
#                   --time=0:30:00)
#   ARRAY_LIMIT     at most this many tasks at once (default: no limit)
#
# Each task runs `cerebseg BIDS_DIR OUTPUT_DIR participant --participant-label LABEL -w WORK_DIR
# --nprocs N --omp-nthreads N --mem-gb M` with N and M from the task's allocation, then the
# options given here. Logs: WORK_DIR/slurm/cerebseg-<job>_<task>.out (and the participants'
# own logs and crash files in OUTPUT_DIR/sub-*/log/). Re-submit the failed tasks alone with
#   sbatch --array=<task ids> ... (the command is printed), or run this script again with
#   PARTICIPANTS="..."; the work folder resumes what was done.
set -euo pipefail

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

mode=${1:-}
case "$mode" in
  --task)   # inside an array task: LIST BIDS OUT WORK [options]
    shift
    list=$1 bids=$2 out=$3 work=$4; shift 4
    label=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$list")
    [ -n "$label" ] || { echo "no participant for task ${SLURM_ARRAY_TASK_ID} in $list" >&2; exit 2; }
    cpus=${SLURM_CPUS_PER_TASK:-1}
    mem_gb=$(( ${SLURM_MEM_PER_NODE:-$(( ${SLURM_MEM_PER_CPU:-4096} * cpus ))} / 1024 ))
    [ "$mem_gb" -ge 1 ] || mem_gb=1
    echo "task ${SLURM_ARRAY_TASK_ID}: participant ${label} (${cpus} CPUs, ${mem_gb} GB) on $(hostname)"
    # shellcheck disable=SC2086  # CEREBSEG may be a command with arguments
    exec ${CEREBSEG:-cerebseg} "$bids" "$out" participant --participant-label "$label" \
        -w "$work" --nprocs "$cpus" --omp-nthreads "$cpus" --mem-gb "$mem_gb" "$@"
    ;;
  --group)  # the group job: BIDS OUT
    shift
    # shellcheck disable=SC2086
    exec ${CEREBSEG:-cerebseg} "$1" "$2" group
    ;;
  ''|-h|--help) usage ;;
esac

[ $# -ge 2 ] || usage
bids=$(cd "$1" && pwd) || { echo "BIDS_DIR $1 not found" >&2; exit 2; }
mkdir -p "$2"
out=$(cd "$2" && pwd)
shift 2
work=${WORK_DIR:-$(dirname "$out")/cerebseg-work}
mkdir -p "$work/slurm"
work=$(cd "$work" && pwd)
command -v sbatch >/dev/null || { echo "sbatch not found: run this on a SLURM login node" >&2; exit 2; }

if [ -n "${PARTICIPANTS:-}" ]; then
  labels=$(printf '%s\n' $PARTICIPANTS | sed 's/^sub-//')
else
  labels=$(find "$bids" -mindepth 1 -maxdepth 1 -type d -name 'sub-*' -printf '%f\n' \
           | sed 's/^sub-//' | sort)
fi
n=$(printf '%s\n' "$labels" | grep -c . || true)
[ "$n" -gt 0 ] || { echo "no participants (sub-* folders) in $bids" >&2; exit 65; }
list="$work/slurm/participants-$(date +%Y%m%d-%H%M%S)-$$.txt"
printf '%s\n' "$labels" | grep . > "$list"

script=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
limit=${ARRAY_LIMIT:+%$ARRAY_LIMIT}
# shellcheck disable=SC2086  # the sbatch options are words
array=$(sbatch --parsable --job-name=cerebseg --array="0-$((n - 1))$limit" \
        --output="$work/slurm/cerebseg-%A_%a.out" \
        ${SBATCH_ARGS:---cpus-per-task=2 --mem=8G --time=2:00:00} \
        "$script" --task "$list" "$bids" "$out" "$work" "$@")
array=${array%%;*}
# shellcheck disable=SC2086
group=$(sbatch --parsable --job-name=cerebseg-group --dependency="afterany:$array" \
        --output="$work/slurm/cerebseg-group-%j.out" \
        ${GROUP_SBATCH_ARGS:---cpus-per-task=1 --mem=2G --time=0:30:00} \
        "$script" --group "$bids" "$out")
group=${group%%;*}
echo "participants: job array $array ($n tasks, list $list)"
echo "group:        job $group (after the array)"
echo "logs:         $work/slurm/"
