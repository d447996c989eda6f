#!/usr/bin/env bash
# Stop the cluster that scripts/slurm-up.sh started from a state folder: cancel its jobs, then
# stop slurmd, slurmctld and munged by the pids in their pid files. Nothing else is touched.
#
#   scripts/slurm-down.sh /tmp/vc-slurm          # keeps the folder (logs)
#   scripts/slurm-down.sh --remove /tmp/vc-slurm # and deletes it
set -uo pipefail

REMOVE=0
if [ "${1:-}" = --remove ]; then REMOVE=1; shift; fi
STATE=$(realpath -m "${1:-${VIRTUALCELL_SLURM_DIR:-/tmp/virtualcell-slurm}}")
[ -d "$STATE" ] || { echo "slurm-down: no cluster in $STATE" >&2; exit 0; }
export SLURM_CONF="$STATE/slurm.conf"

# A pid file names our daemon only while that pid still runs a program of that name.
alive() { [ -f "$STATE/$1.pid" ] && [ "$(cat "/proc/$(cat "$STATE/$1.pid")/comm" 2>/dev/null)" = "$1" ]; }

if alive slurmctld && [ -f "$SLURM_CONF" ]; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
fi
for daemon in slurmd slurmctld munged; do
    alive "$daemon" || continue
    pid=$(cat "$STATE/$daemon.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "slurm-down: $daemon ($pid) ignored SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
done
if [ "$REMOVE" = 1 ]; then rm -rf "$STATE"; fi
echo "slurm-down: stopped the cluster in $STATE" >&2
