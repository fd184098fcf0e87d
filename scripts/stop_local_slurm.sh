#!/usr/bin/env bash
# stop_local_slurm.sh - stop the daemons started by start_local_slurm.sh,
# each by the PID in its pid file (never by process name).
# Cancels queued/running jobs first so no slurmstepd is left behind.
# Leaves packages, config and state in place (start again at any time).
# Idempotent: a daemon that is not running is reported and skipped. Must run as root.
set -uo pipefail
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }

log() { echo "[stop_local_slurm] $*"; }

pid_alive() {  # pid_alive PIDFILE COMM
  local f=$1 comm=$2 p
  [ -s "$f" ] || return 1
  p=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$p" ] && [ -d "/proc/$p" ] || return 1
  [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$comm" ]
}

stop_pid() {  # stop_pid PIDFILE COMM
  local f=$1 comm=$2 p
  if ! pid_alive "$f" "$comm"; then log "$comm not running"; return 0; fi
  p=$(cat "$f")
  log "stopping $comm (pid $p)"
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || { rm -f "$f"; return 0; }; sleep 0.1; done
  log "$comm (pid $p) still alive after 15s, sending SIGKILL"
  kill -KILL "$p" 2>/dev/null || true
  rm -f "$f"
}

if pid_alive /run/slurmctld.pid slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

stop_pid /run/slurmd.pid slurmd
stop_pid /run/slurmctld.pid slurmctld        # its child slurmscriptd exits with it
stop_pid /run/slurmdbd.pid slurmdbd

if [ -s /run/mysqld/mysqld.pid ] && pid_alive /run/mysqld/mysqld.pid mariadbd; then
  p=$(cat /run/mysqld/mysqld.pid)
  log "stopping mariadbd (pid $p) with mariadb-admin shutdown"
  mariadb-admin shutdown 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done   # mysqld_safe exits by itself
  kill -0 "$p" 2>/dev/null && log "mariadbd (pid $p) did not exit"
fi

stop_pid /run/munge/munged.pid munged
log "done"
