#!/usr/bin/env bash
# A throw-away SLURM cluster on this one machine, for tests and CI: munged + slurmctld + N slurmd daemons that
# emulate nodes node1..nodeN (Debian's slurm 22.05 is built with MULTIPLE_SLURMD). Needs root and apt.
#
#   slurm/local_cluster.sh start     install packages if missing, start (idempotent), wait until nodes are idle
#   slurm/local_cluster.sh stop      cancel jobs, stop only the daemons whose PIDs this script recorded
#   slurm/local_cluster.sh status
#
# Environment: SDTRAIN_SLURM_DIR (state, logs, pids; default /tmp/sdtrain-slurm), SDTRAIN_SLURM_NODES (2),
# SDTRAIN_SLURM_CPUS (CPUs declared per node, may exceed the real count; 4).
set -euo pipefail

DIR=${SDTRAIN_SLURM_DIR:-/tmp/sdtrain-slurm}
NODES=${SDTRAIN_SLURM_NODES:-2}
CPUS=${SDTRAIN_SLURM_CPUS:-4}
CONF=$DIR/etc/slurm.conf
RUN=$DIR/run
LOG=$DIR/log
export SLURM_CONF=$CONF

say() { echo "[local_cluster $(date +%T)] $*"; }
fail() {
  echo "[local_cluster] error: $*" >&2
  for f in "$LOG"/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }; done
  exit 1
}
# alive PIDFILE NAME: the recorded pid is running and is NAME (never signal a recycled pid)
alive() { local p; [ -s "$1" ] && p=$(cat "$1") && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]; }
wait_until() { # wait_until SECONDS WHAT COMMAND...
  local end=$(($(date +%s) + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || fail "timed out after ${1:-?}s waiting for $what"
    sleep 0.3
  done
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return
  say "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # the packages' scripts cannot start services here (policy-rc.d); this script starts the daemons itself
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  fi
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
  wait_until 10 "munged" test -s /run/munge/munged.pid
  cp /run/munge/munged.pid "$RUN/munged.pid"
  wait_until 10 "munge to answer" sh -c 'munge -n | unmunge'
}

write_config() {
  local host
  host=$(hostname -s)
  cat > "$CONF" <<EOF
# written by sdtrain slurm/local_cluster.sh: one host, $NODES emulated nodes
ClusterName=sdtrain-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
# a requeued job is held for cred_expire (default 120 s): 10 s keeps the requeue tests short
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=node[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mkdir -p /etc/slurm
  ln -sfn "$CONF" /etc/slurm/slurm.conf  # clients find it without SLURM_CONF
  for n in $(seq -f "node%g" 1 "$NODES"); do
    getent hosts "$n" >/dev/null || echo "127.0.0.1 $n # sdtrain local_cluster" >> /etc/hosts
  done
}

nodes_idle() { [ "$(sinfo -h -N -o '%t' | grep -cE '^(idle|mix|alloc)$')" = "$NODES" ]; }

start() {
  [ "$(id -u)" = 0 ] || fail "must run as root"
  local t0
  t0=$(date +%s)
  install_packages
  mkdir -p "$DIR/etc" "$RUN" "$LOG" "$DIR/state"
  start_munge
  if ! alive "$RUN/slurmctld.pid" slurmctld; then
    write_config
    rm -rf "$DIR/state/ctld" && mkdir -p "$DIR/state/ctld"
    slurmctld
    wait_until 20 "slurmctld" test -s "$RUN/slurmctld.pid"
    wait_until 30 "slurmctld to answer" scontrol ping
  fi
  for n in $(seq -f "node%g" 1 "$NODES"); do
    alive "$RUN/slurmd-$n.pid" slurmd || { rm -f "$RUN/slurmd-$n.pid"; slurmd -N "$n"; }
    wait_until 20 "slurmd $n" test -s "$RUN/slurmd-$n.pid"
  done
  local end=$(($(date +%s) + 60))
  until nodes_idle; do
    sinfo -h -N -o '%t' | grep -qE 'drain|down' && scontrol update nodename="node[1-$NODES]" state=resume 2>/dev/null
    [ "$(date +%s)" -lt "$end" ] || fail "nodes not idle after 60 s: $(sinfo -h -N -o '%N %t' | paste -sd' ')"
    sleep 0.5
  done
  say "up in $(($(date +%s) - t0)) s: $(sinfo -h -o '%D nodes, partition %P')"
}

stop_pid() { # stop_pid PIDFILE NAME
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  local p
  p=$(cat "$1")
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 1 50); do [ -d "/proc/$p" ] || break; sleep 0.2; done
  [ -d "/proc/$p" ] && kill -KILL "$p" 2>/dev/null
  rm -f "$1"
}

stop() {
  if alive "$RUN/slurmctld.pid" slurmctld && scontrol ping >/dev/null 2>&1; then
    local jobs
    jobs=$(squeue -h -o %A | paste -sd' ')
    if [ -n "$jobs" ]; then
      scancel $jobs
      for _ in $(seq 1 60); do [ -z "$(squeue -h -o %A)" ] && break; sleep 0.5; done
    fi
  fi
  for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f" slurmd; done
  stop_pid "$RUN/slurmctld.pid" slurmctld
  stop_pid "$RUN/munged.pid" munged
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) alive "$RUN/slurmctld.pid" slurmctld && sinfo -N || { echo "not running"; exit 1; } ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
