#!/usr/bin/env bash
# start_local_slurm.sh - install (if missing), configure and start a real
# single-node Slurm cluster (munged + slurmctld + slurmd, optionally
# mariadb + slurmdbd) on this machine, from Debian 12's own packages.
#
# Idempotent: run it as often as you like; it only installs what is missing,
# rewrites config files only when their content changes (and then restarts
# the daemons), and only starts daemons that are not already running.
# Daemons are started in their own daemon mode (they detach, close stdio and
# write pid files), so the script returns even when its output is piped.
#
# Must run as root.  No systemd needed.  Tested on Debian 12 (slurm-wlm 22.05, munge 0.5.15), 2 cores: about 12 s
# the first time (apt-get install), about 1 s once installed and configured, a no-op while running.
#
# Use with iif (tests/test_slurm.py does the same; conf/site/localhost.yaml sets partition=debug):
#   bash scripts/start_local_slurm.sh
#   iif-train -m launcher=slurm site@hydra.launcher=localhost resources.cpus_per_task=1 resources.mem_gb=2 \
#       experiment=toy2d base_model=gmm_exact method=iif,reward_only debug=fast
#   bash scripts/stop_local_slurm.sh
#
# Caveats of this one-node cluster:
#   - No GPUs are configured (no gres): gpus_per_node must stay null, so only `resources=cpu` fits; the node has
#     the machine's CPUs and 95% of its memory, so ask for little (cpus_per_task=1, mem_gb=2) to run jobs side by side.
#   - Without accounting (the default) `sacct` fails: submitit then learns that a job ended only from its result
#     file and waits forever for a job killed without one (iif raises its start-up errors so that they do produce a
#     result; tests bound every wait and scancel on failure). SLURM_ACCOUNTING=1 adds mariadb + slurmdbd (~20 s).
#     submitit then also prints a "Bypassing sacct error" warning at each status poll: harmless.
#   - `scontrol requeue` (also what submitit runs on a time-out or preemption) makes the job eligible again only
#     ~120 s later (Slurm's fixed delay, shown as Reason=BeginTime); `scontrol update jobid=ID StartTime=now`
#     releases it at once, but wait ~2 s after it is PENDING again: a job started within the second its old
#     credential was revoked fails ("Job credential revoked") and is not requeued again. Real clusters have the
#     same 120 s delay.
#   - A cancelled or requeued job keeps the node COMPLETING for up to KillWait=5 s: submitit's jobs ignore SIGTERM.
#   - Everything runs as root, no cgroups: memory and CPU limits are bookkeeping only, not enforced.
#   - Daemons are not supervised: after a reboot (or stop_local_slurm.sh) run this script again.
#
# Environment knobs:
#   SLURM_ACCOUNTING=1   also install/start mariadb + slurmdbd so that `sacct`
#                        works (submitit uses sacct to detect jobs that die
#                        without writing their result; see stop/README notes).
#                        Default 0: AccountingStorageType=accounting_storage/none.
#   SLURM_PARTITION=debug  partition name (default "debug")
#   SLURM_WAIT_S=60        how long to wait for the node to become idle
set -euo pipefail

ACCOUNTING="${SLURM_ACCOUNTING:-0}"
PARTITION="${SLURM_PARTITION:-debug}"
WAIT_S="${SLURM_WAIT_S:-60}"
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
DB_PASS=slurmdbpass   # local-only test database, bound to localhost

log() { echo "[start_local_slurm] $*"; }
die() { echo "[start_local_slurm] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

# pid_alive PIDFILE COMM -> 0 if the pid in PIDFILE is alive and is COMM
pid_alive() {
  local f=$1 comm=$2 p
  [ -s "$f" ] || return 1
  p=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$p" ] && [ -d "/proc/$p" ] || return 1
  [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$comm" ]
}

# ---------------------------------------------------------------- install --
need_pkgs=()
for pair in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
if [ "$ACCOUNTING" = 1 ]; then
  command -v slurmdbd >/dev/null 2>&1 || need_pkgs+=(slurmdbd)
  command -v mariadbd >/dev/null 2>&1 || need_pkgs+=(mariadb-server)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing: ${need_pkgs[*]}"
  t0=$(date +%s)
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >/tmp/start_local_slurm.apt.log 2>&1; then
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update -q >>/tmp/start_local_slurm.apt.log 2>&1
    apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >>/tmp/start_local_slurm.apt.log 2>&1 \
      || { tail -20 /tmp/start_local_slurm.apt.log >&2; die "apt-get install failed"; }
  fi
  log "installed in $(( $(date +%s) - t0 ))s ($(dpkg-query -W -f='${Version}' slurmctld) slurm, $(dpkg-query -W -f='${Version}' munge) munge)"
fi

# ------------------------------------------------------------------ munge --
getent passwd munge >/dev/null || die "user munge missing (munge package broken?)"
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/log/munge; chmod 0400 /etc/munge/munge.key
chmod 0711 /var/lib/munge; chmod 0755 /run/munge
if ! pid_alive /run/munge/munged.pid munged; then
  log "starting munged"
  rm -f /run/munge/munged.pid
  # munged forks into the background itself; run it as the munge user
  runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

# ----------------------------------------------------------------- config --
NODE=$(hostname -s)
# Parse the hardware line printed by `slurmd -C`; keep ~5% memory headroom so
# the node never registers with less memory than configured (-> DRAIN).
read -r CPUS BOARDS SPB CPS TPC MEM < <(slurmd -C | head -1 | tr ' ' '\n' | awk -F= '
  {v[$1]=$2} END {print v["CPUs"], v["Boards"], v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"]}')
MEM=$(( MEM * 95 / 100 ))
[ "$MEM" -gt 0 ] || die "could not parse 'slurmd -C'"
if [ "$ACCOUNTING" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi

mkdir -p "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
NEW_CONF=$(cat <<EOF
# generated by start_local_slurm.sh
ClusterName=localcluster
# explicit 127.0.0.1 so nothing depends on resolving the hostname
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
# no cgroups at all
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
# a cancelled/timed-out job keeps the (only) node COMPLETING for up to KillWait
# seconds (submitit jobs ignore SIGTERM); the default 30s stalls the whole queue
KillWait=5
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=${CTLD_SPOOL}
SlurmdSpoolDir=${SLURMD_SPOOL}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, a job that gives no --mem gets the whole node's memory
DefMemPerCPU=1024
${ACCT_LINES}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} Boards=${BOARDS} SocketsPerBoard=${SPB} CoresPerSocket=${CPS} ThreadsPerCore=${TPC} RealMemory=${MEM} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
CONF_CHANGED=0
if [ "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" != "$NEW_CONF" ]; then
  log "writing $CONF_DIR/slurm.conf"
  printf '%s\n' "$NEW_CONF" > "$CONF_DIR/slurm.conf"
  chmod 0644 "$CONF_DIR/slurm.conf"
  CONF_CHANGED=1
fi

stop_pidfile() {  # stop_pidfile PIDFILE COMM
  local p
  pid_alive "$1" "$2" || return 0
  p=$(cat "$1"); log "stopping $2 (pid $p) to apply the new config"
  kill "$p"
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
}
if [ "$CONF_CHANGED" = 1 ]; then
  stop_pidfile /run/slurmd.pid slurmd
  stop_pidfile /run/slurmctld.pid slurmctld
fi

# ------------------------------------------------ accounting (optional) --
if [ "$ACCOUNTING" = 1 ]; then
  if ! mariadb-admin ping >/dev/null 2>&1; then
    log "starting mariadb"
    /etc/init.d/mariadb start >/dev/null   # mysqld_safe in the background, stdio to /dev/null
    for _ in $(seq 100); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  mariadb-admin ping >/dev/null 2>&1 || die "mariadb did not start"
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  NEW_DBD=$(cat <<EOF
# generated by start_local_slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=${LOG_DIR}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
EOF
)
  if [ "$(cat "$CONF_DIR/slurmdbd.conf" 2>/dev/null)" != "$NEW_DBD" ]; then
    log "writing $CONF_DIR/slurmdbd.conf"
    printf '%s\n' "$NEW_DBD" > "$CONF_DIR/slurmdbd.conf"
    stop_pidfile /run/slurmdbd.pid slurmdbd
  fi
  chmod 0600 "$CONF_DIR/slurmdbd.conf"   # slurmdbd refuses a world-readable file
  if ! pid_alive /run/slurmdbd.pid slurmdbd; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
    for _ in $(seq 100); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  sacctmgr -n show cluster >/dev/null 2>&1 || die "slurmdbd not answering (see $LOG_DIR/slurmdbd.log)"
fi

# ----------------------------------------------------- slurmctld / slurmd --
if ! pid_alive /run/slurmctld.pid slurmctld; then
  log "starting slurmctld"
  /usr/sbin/slurmctld          # daemonizes; state kept in $CTLD_SPOOL
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping | grep -q UP || die "slurmctld not answering (see $LOG_DIR/slurmctld.log)"

if ! pid_alive /run/slurmd.pid slurmd; then
  log "starting slurmd"
  /usr/sbin/slurmd
fi

# ------------------------------------------------------ wait for the node --
state=""
for i in $(seq $(( WAIT_S * 2 ))); do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|drained*|fail*|inval*)
      # e.g. left DOWN from an unclean earlier stop; ReturnToService=2 normally handles it
      [ $(( i % 10 )) = 0 ] && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle|mixed|allocated|completing) ;;
  *) sinfo -R >&2 || true; die "node $NODE not usable (state '$state'); see $LOG_DIR/slurmd.log" ;;
esac

sinfo
cat <<EOF
[start_local_slurm] Slurm is up: node ${NODE}, partition ${PARTITION}, accounting=$( [ "$ACCOUNTING" = 1 ] && echo slurmdbd || echo none )
[start_local_slurm] pids: munged=$(cat /run/munge/munged.pid) slurmctld=$(cat /run/slurmctld.pid) slurmd=$(cat /run/slurmd.pid)$( [ "$ACCOUNTING" = 1 ] && echo " slurmdbd=$(cat /run/slurmdbd.pid) mariadbd=$(cat /run/mysqld/mysqld.pid)" )
[start_local_slurm] logs: ${LOG_DIR}/*.log
[start_local_slurm] to stop: bash $(dirname "$(readlink -f "$0")")/stop_local_slurm.sh
EOF
