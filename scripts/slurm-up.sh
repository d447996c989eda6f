#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on this machine, for tests and for trying profiles/slurm.
#
#   eval "$(scripts/slurm-up.sh /tmp/vc-slurm)"   # installs slurm-wlm + munge if missing (root, apt)
#   sinfo; snakemake --workflow-profile profiles/slurm ...
#   scripts/slurm-down.sh /tmp/vc-slurm
#
# Everything lives in the state folder given (default /tmp/virtualcell-slurm): slurm.conf,
# gres.conf, a private munge key and socket, logs, spool, pid files. Ports are picked free,
# so it never touches /etc/slurm or a cluster already running here, and two can run side by
# side. Clients find it through SLURM_CONF and PATH, the one line this script prints on stdout.
#
# The node has the machine's cores and 90% of its memory, and a fake GPU per core (gres gpu,
# backed by /dev/null) so that --gpus/--gres requests schedule. No accounting daemon: completed
# jobs stay visible to squeue/scontrol for MinJobAge (2 h) and are written to jobcomp.log.
# Memory limits are enforced by polling (jobacct_gather OverMemoryKill), not cgroups, so it
# also works inside containers.
set -euo pipefail

STATE=$(realpath -m "${1:-${VIRTUALCELL_SLURM_DIR:-/tmp/virtualcell-slurm}}")
PYTHON=${PYTHON:-python3}
log() { echo "slurm-up: $*" >&2; }
# On failure, stop whatever this script had started already.
die() { log "error: $*"; bash "$(dirname "$0")/slurm-down.sh" "$STATE" 2>/dev/null || true; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (munged, slurmctld and slurmd run as root); run it with sudo"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2
fi

if [ -e "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    log "error: a cluster is already running from $STATE; stop it with scripts/slurm-down.sh $STATE"
    exit 1
fi
mkdir -p "$STATE"/{munge,ctld,slurmd}
chmod 700 "$STATE" "$STATE/munge"

# Two free TCP ports (controller, node daemon).
read -r CTLD_PORT SLURMD_PORT < <("$PYTHON" - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
HOST=$(hostname -s)
NODE="vc${SLURMD_PORT}"
CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)

# munge: a private key and socket, so a munged already on this machine is left alone.
dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$STATE/munge/munge.key"
munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
    --pid-file="$STATE/munged.pid" --log-file="$STATE/munged.log" \
    --seed-file="$STATE/munge/munged.seed" 2>>"$STATE/munged.log" \
    || die "munged did not start; see $STATE/munged.log"

cat > "$STATE/slurm.conf" <<CONF
# Written by scripts/slurm-up.sh: a single-node test cluster in $STATE.
ClusterName=virtualcell
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${STATE}/munge/munge.socket
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/slurmd
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmctldLogFile=${STATE}/slurmctld.log
SlurmdLogFile=${STATE}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
SwitchType=switch/none
# No cgroups (containers): track processes by parent id, enforce memory by polling.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
# No slurmdbd: the executor plugin must poll with squeue, which sees finished jobs for MinJobAge
# seconds (well above its polling interval); jobcomp.log keeps a line per finished job, but without
# the job's comment or GPU request, so the tests read those from scontrol after a whole workflow
# has run: 2 h, not 10 min (a slow CI machine took 763 s and lost the first jobs' records).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${STATE}/jobcomp.log
MinJobAge=7200
# Cores and memory are consumable, so jobs share the node; a job without a memory request
# gets DefMemPerCPU instead of the whole node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
GresTypes=gpu
KillWait=5
InactiveLimit=0
ReturnToService=2
# Trust the CPU and memory figures below over what slurmd detects (containers misreport).
SlurmdParameters=config_overrides
NodeName=${NODE} NodeHostname=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} Gres=gpu:${CPUS} State=UNKNOWN
PartitionName=main Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF

# Fake GPUs, one per core (so GPU requests never serialise more than the cores do): the gres
# exists for scheduling, and jobs see CUDA_VISIBLE_DEVICES; copies of /dev/null stand in for the
# device files (where mknod is not allowed, a count without files still schedules).
mkdir -p "$STATE/dev"
GPUS="Count=${CPUS}"
if (for i in $(seq 0 $((CPUS - 1))); do mknod "$STATE/dev/gpu$i" c 1 3 2>/dev/null || exit 1; done); then
    GPUS="File=${STATE}/dev/gpu[0-$((CPUS - 1))]"
fi
cat > "$STATE/gres.conf" <<CONF
AutoDetect=off
NodeName=${NODE} Name=gpu ${GPUS}
CONF

# The jobstep plugin runs each job's command with `srun` after dropping every SLURM_* variable,
# SLURM_CONF included; a real cluster's config sits at /etc/slurm, this one's does not. So srun
# is reached through a wrapper that puts SLURM_CONF back (callers put $STATE/bin first on PATH).
mkdir -p "$STATE/bin"
cat > "$STATE/bin/srun" <<SHIM
#!/bin/sh
SLURM_CONF="$STATE/slurm.conf" exec $(command -v srun) "\$@"
SHIM
chmod +x "$STATE/bin/srun"

export SLURM_CONF="$STATE/slurm.conf"
slurmctld -f "$SLURM_CONF" || die "slurmctld did not start; see $STATE/slurmctld.log"
slurmd -f "$SLURM_CONF" -N "$NODE" || die "slurmd did not start; see $STATE/slurmd.log"

for _ in $(seq 1 60); do
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
    case "$state" in
        idle|mix|alloc) break ;;
        drain*|down*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
[ "${state:-}" = idle ] || die "node $NODE is '${state:-not registered}', not idle; see $STATE/slurmctld.log and $STATE/slurmd.log"
log "node $NODE idle: $CPUS CPUs, $MEM_MB MB, gpu:$CPUS (fake); controller on 127.0.0.1:$CTLD_PORT; state in $STATE"
echo "export SLURM_CONF=$SLURM_CONF PATH=$STATE/bin:\$PATH"
