#!/usr/bin/env bash
# Test fixture, adapted from ../shared/slurm/single-node-cluster.sh (verified there).
# Start (or stop) a real single-node SLURM cluster on a Debian 12 machine, as root, without systemd.
# Usage: single-node-cluster.sh start|stop    (BASE=/some/dir overrides the state folder)
# Known to work: slurm-wlm 22.05.8 and munge 0.5.15 from Debian 12, with snakemake 9.27 and
# snakemake-executor-plugin-slurm 2.8 (profile: slurm-status-command: squeue).
set -euo pipefail
B=${BASE:-/tmp/kneurons-slurm}; H=$(hostname -s)
start() {
  export DEBIAN_FRONTEND=noninteractive
  command -v slurmctld >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
  rm -rf "$B/var" "$B/log"; mkdir -p "$B/etc" "$B/var/ctld" "$B/var/d" "$B/log" "$B/fakegpu" /etc/slurm
  # gres/gpu drops GPUs without device files and rejects regular files: use /dev/null-like char devices
  for i in 0 1 2 3; do [ -c "$B/fakegpu/nvidia$i" ] || mknod "$B/fakegpu/nvidia$i" c 1 3; done
  printf '%s\n' ClusterName=ci "SlurmctldHost=$H(127.0.0.1)" SlurmUser=root MailProg=/bin/true \
    StateSaveLocation=$B/var/ctld SlurmdSpoolDir=$B/var/d SlurmctldPidFile=$B/var/slurmctld.pid \
    SlurmdPidFile=$B/var/slurmd.pid SlurmctldLogFile=$B/log/slurmctld.log SlurmdLogFile=$B/log/slurmd.log \
    ProctrackType=proctrack/linuxproc TaskPlugin=task/none JobAcctGatherType=jobacct_gather/none \
    AccountingStorageType=accounting_storage/none JobCompType=jobcomp/filetxt JobCompLoc=$B/log/jobcomp.txt \
    SelectType=select/cons_tres SelectTypeParameters=CR_Core_Memory DefMemPerCPU=1000 MinJobAge=600 GresTypes=gpu \
    "NodeName=$H NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=8000 Gres=gpu:4 State=UNKNOWN" \
    "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP" > "$B/etc/slurm.conf"
  echo "NodeName=$H Name=gpu File=$B/fakegpu/nvidia[0-3]" > "$B/etc/gres.conf"
  # the default path is required: the plugin's job step removes SLURM_CONF before its nested srun
  ln -sfn "$B/etc/slurm.conf" /etc/slurm/slurm.conf; ln -sfn "$B/etc/gres.conf" /etc/slurm/gres.conf
  install -d -o munge -g munge /run/munge
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || { runuser -u munge -- /usr/sbin/munged; echo /run/munge/munged.pid > "$B/var/started-munge"; }
  /usr/sbin/slurmctld; /usr/sbin/slurmd -N "$H"
  for _ in $(seq 30); do sinfo -hN -o %T | grep -qx idle && return 0; sleep 1; done
  tail -n 20 "$B"/log/*.log; return 1
}
stop() {
  for p in "$B/var/slurmd.pid" "$B/var/slurmctld.pid" $(cat "$B/var/started-munge" 2>/dev/null); do
    [ -s "$p" ] || continue; pid=$(<"$p"); kill "$pid" 2>/dev/null || continue
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
  done
}
case "${1:-}" in start) start ;; stop) stop ;; *) echo "usage: $0 start|stop" >&2; exit 2 ;; esac
