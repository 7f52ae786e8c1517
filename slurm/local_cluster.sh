#!/usr/bin/env bash
# A throw-away Slurm cluster on this machine, to try `sbatch slurm/alexnet.sh` on one box and to
# test it against real Slurm daemons (slurmctld, slurmd, munge from the Debian packages).
#
#   slurm/local_cluster.sh start [--nodes 1|2] [--cpus N] [--dir DIR]   start (or reuse) a cluster
#   eval "$(slurm/local_cluster.sh env [--dir DIR])"                     point sbatch/squeue at it
#   slurm/local_cluster.sh status [--dir DIR]                            daemons and nodes; exit 1 if down
#   slurm/local_cluster.sh stop [--dir DIR]                              cancel its jobs, stop its daemons
#   slurm/local_cluster.sh install                                       only install the packages
#
# Needs root (the daemons run as the users `slurm` and `munge`; slurmd runs jobs as their user).
# Missing packages are installed with apt-get. Everything the cluster owns lives under DIR
# (default /tmp/alexnet-slurm): slurm.conf, its own MUNGE key and socket, state, spool, logs and
# PID files, so that two clusters in two folders do not see each other. The emulated nodes are
# ci-node1 and ci-node2 on 127.0.0.1 (a marked line in /etc/hosts, removed again by `stop`), each
# with 2 fake GPUs (/dev/null) for `--gpus-per-node` requests. Daemons are stopped by the PIDs
# this script recorded, never by name. Calling start or stop twice is harmless.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
NODE_NAMES=(ci-node1 ci-node2)
HOSTS_FILE=${ALEXNET_HOSTS_FILE:-/etc/hosts}  # another file only in the script's tests
HOSTS_LOCK=/tmp/.alexnet-local-cluster-hosts.lock

die() {
    echo "local_cluster.sh: error: $*" >&2
    exit 1
}
say() { echo "local_cluster.sh: $*" >&2; }

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

# ---- packages ----------------------------------------------------------------------------
have_packages() {
    [[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/sbin/munged ]] &&
        command -v sbatch >/dev/null && command -v scontrol >/dev/null
}

install_packages() {
    have_packages && return 0
    [[ $EUID -eq 0 ]] || die "Slurm is not installed and installing it needs root: apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die "Slurm is not installed and this machine has no apt-get to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} with apt-get"
    # On a systemd host the packages' postinst would start the daemons before any slurm.conf
    # exists; a policy-rc.d that exits 101 tells invoke-rc.d not to start services.
    local guard=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        guard=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$guard"
        chmod 755 "$guard"
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
                --no-install-recommends "${PACKAGES[@]}"
    } >&2 || rc=$?
    [[ -n $guard ]] && rm -f "$guard"
    [[ $rc -eq 0 ]] || die "apt-get install ${PACKAGES[*]} failed (exit $rc)"
    have_packages || die "apt-get installed ${PACKAGES[*]} but slurmctld/slurmd/munged/sbatch are still missing"
}

# ---- processes by PID file ---------------------------------------------------------------
# A PID file names a live daemon only if that process still runs the expected program (a PID
# can be reused after a crash or a reboot).
# A zombie (exited, not yet reaped by an init that may never reap it) counts as stopped.
pid_alive() {
    local pidfile=$1 name=$2 pid stat
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$name"* ]] || return 1
    stat=$(</proc/"$pid"/stat) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

stop_pid() {
    local pidfile=$1 name=$2 pid i
    if ! pid_alive "$pidfile" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pidfile" "$name" || break
        sleep 0.1
    done
    if pid_alive "$pidfile" "$name"; then
        say "$name (pid $pid) ignored SIGTERM for 10 s: sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# ---- /etc/hosts --------------------------------------------------------------------------
# Rewritten in place (cat >, not mv: /etc/hosts may be a bind mount), under a lock, touching
# only the line that carries this cluster's marker.
hosts_marker() { echo "# alexnet-local-cluster:$DIR"; }

# Also drops the lines of clusters whose folder is gone (a run killed before its `stop`).
hosts_add() {
    (
        flock 9
        local tmp line dir
        tmp=$(mktemp)
        while IFS= read -r line || [[ -n $line ]]; do
            if [[ $line == *"# alexnet-local-cluster:"* ]]; then
                dir=${line##*# alexnet-local-cluster:}
                [[ -d $dir && $dir != "$DIR" ]] || continue
            fi
            printf '%s\n' "$line"
        done <"$HOSTS_FILE" >"$tmp"
        echo "127.0.0.1 ${NODE_NAMES[*]} $(hosts_marker)" >>"$tmp"
        cmp -s "$tmp" "$HOSTS_FILE" || cat "$tmp" >"$HOSTS_FILE"
        rm -f "$tmp"
    ) 9>"$HOSTS_LOCK"
}

hosts_remove() {
    (
        flock 9
        local tmp line
        tmp=$(mktemp)
        while IFS= read -r line || [[ -n $line ]]; do
            # This folder's line only, compared whole: a substring match on the marker would also
            # drop the line of a cluster in DIR-ci, say, and break its node names.
            [[ $line == *"# alexnet-local-cluster:"* && ${line##*# alexnet-local-cluster:} == "$DIR" ]] && continue
            printf '%s\n' "$line"
        done <"$HOSTS_FILE" >"$tmp"
        cmp -s "$tmp" "$HOSTS_FILE" || cat "$tmp" >"$HOSTS_FILE"
        rm -f "$tmp"
    ) 9>"$HOSTS_LOCK"
}

# ---- configuration -----------------------------------------------------------------------
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Ports from a hash of DIR (two clusters in two folders get different ones), the first three
# free ones from there; 30000-32699 stays below the ephemeral range and away from the
# rendezvous ports slurm/alexnet.sh derives from job ids (20000-29999).
pick_ports() {
    local base tries p ok
    base=$((30000 + 3 * ($(cksum <<<"$DIR" | cut -d' ' -f1) % 900)))
    for ((tries = 0; tries < 900; tries++)); do
        ok=1
        for p in "$base" "$((base + 1))" "$((base + 2))"; do
            port_free "$p" || ok=0
        done
        if [[ $ok -eq 1 ]]; then
            echo "$base"
            return 0
        fi
        base=$((30000 + (base - 30000 + 3) % 2700))
    done
    die "no three free TCP ports in 30000-32699"
}

write_config() {
    local nodes=$1 cpus=$2 port=$3 host mem first_job i
    host=$(hostname -s)
    getent hosts "$host" >/dev/null || die "this machine's hostname '$host' does not resolve (add it to /etc/hosts)"
    mem=$(awk '/^MemTotal:/ { m = int($2 / 1024 / 2); print (m > 4096 ? 4096 : m) }' /proc/meminfo)
    # Job ids start at a number drawn from DIR's hash, so that jobs of two clusters on one machine
    # do not share ids (alexnet.sh derives its rendezvous port from the id).
    first_job=$((1000 + ($(cksum <<<"$DIR$(date +%s)" | cut -d' ' -f1) % 8000) * 10))
    local node_list=("${NODE_NAMES[@]:0:$nodes}")
    {
        echo "# Written by slurm/local_cluster.sh: a throw-away cluster in $DIR"
        echo "ClusterName=alexnet-local-$(cksum <<<"$DIR" | cut -d' ' -f1)"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=$port"
        echo "SlurmUser=slurm"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        # cred_expire: without it a requeued job waits about 140 s before it may run again
        echo "AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10"
        echo "SchedulerParameters=sched_interval=2,bf_interval=2"
        echo "StateSaveLocation=$DIR/state"
        echo "SlurmdSpoolDir=$DIR/spool/%n"
        echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
        echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
        echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
        echo "SlurmctldDebug=info"
        echo "SlurmdDebug=info"
        # No cgroups in containers: nothing is confined, processes are tracked through /proc.
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        # The emulated nodes may claim more CPUs than the machine has.
        echo "SlurmdParameters=config_overrides"
        echo "MpiDefault=none"
        echo "EnforcePartLimits=ALL"
        echo "KillOnBadExit=1"
        echo "KillWait=5"
        echo "MinJobAge=600"
        echo "ReturnToService=2"
        echo "JobRequeue=1"
        echo "FirstJobId=$first_job"
        echo "MailProg=/bin/true"
        echo "GresTypes=gpu"
        for i in "${!node_list[@]}"; do
            echo "NodeName=${node_list[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 1 + i))" \
                "CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$DIR/slurm.conf"
    # Fake GPUs: Slurm accepts device files only, so /dev/null stands in for each one.
    mkdir -p "$DIR/dev"
    ln -sfn /dev/null "$DIR/dev/gpu0"
    ln -sfn /dev/null "$DIR/dev/gpu1"
    echo "Name=gpu File=$DIR/dev/gpu[0-1]" >"$DIR/gres.conf"
    chmod 644 "$DIR/slurm.conf" "$DIR/gres.conf"
    printf 'NODES=%s\nCPUS=%s\nPORT=%s\n' "$nodes" "$cpus" "$port" >"$DIR/cluster.env"
}

node_list() {
    local nodes
    nodes=$(sed -n 's/^NODES=//p' "$DIR/cluster.env" 2>/dev/null || true)
    echo "${NODE_NAMES[@]:0:${nodes:-0}}"
}

# ---- daemons -----------------------------------------------------------------------------
start_munge() {
    local m=$DIR/munge i
    install -d -m 0755 -o munge -g munge "$m"
    if [[ ! -s $m/munge.key ]]; then
        dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$m/munge.key"
    chmod 0400 "$m/munge.key"
    runuser -u munge -- /usr/sbin/munged --socket="$m/munge.socket" --key-file="$m/munge.key" \
        --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" ||
        die "munged did not start; see $m/munged.log"
    for ((i = 0; i < 50; i++)); do
        [[ -S $m/munge.socket ]] && break
        sleep 0.1
    done
    munge -n -S "$m/munge.socket" | unmunge -S "$m/munge.socket" >/dev/null ||
        die "munged runs but does not answer on $m/munge.socket; see $m/munged.log"
}

start_slurm() {
    local node
    install -d -m 0755 -o slurm -g slurm "$DIR/state" "$DIR/log" "$DIR/run"
    rm -rf "$DIR/spool"
    for node in $(node_list); do
        install -d -m 0755 "$DIR/spool/$node"
    done
    # -c: start from an empty state (a throw-away cluster); -i: ignore unreadable old state.
    /usr/sbin/slurmctld -f "$DIR/slurm.conf" -c -i || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    for node in $(node_list); do
        /usr/sbin/slurmd -f "$DIR/slurm.conf" -N "$node" || die "slurmd -N $node did not start; see $DIR/log/slurmd-$node.log"
    done
}

wait_idle() {
    local i states
    for ((i = 0; i < 300; i++)); do
        states=$(sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')
        [[ $states == "idle " ]] && return 0
        sleep 0.2
    done
    tail -n 20 "$DIR/log/slurmctld.log" >&2 || true
    die "nodes did not become idle in 60 s (states: ${states:-none}); logs in $DIR/log"
}

daemons_alive() {
    local node
    pid_alive "$DIR/munge/munged.pid" munged || return 1
    pid_alive "$DIR/run/slurmctld.pid" slurmctld || return 1
    for node in $(node_list); do
        pid_alive "$DIR/run/slurmd-$node.pid" slurmd || return 1
    done
    [[ -n $(node_list) ]]
}

# ---- commands ----------------------------------------------------------------------------
cmd_start() {
    local nodes=$1 cpus=$2 port
    [[ $nodes == 1 || $nodes == 2 ]] || die "--nodes must be 1 or 2; got '$nodes'"
    [[ $cpus =~ ^[1-9][0-9]*$ ]] || die "--cpus must be a positive integer; got '$cpus'"
    [[ $EUID -eq 0 ]] || die "the local cluster needs root (its daemons run as the users slurm and munge)"
    install_packages
    export SLURM_CONF=$DIR/slurm.conf
    if daemons_alive; then
        if [[ $(sed -n 's/^NODES=//p' "$DIR/cluster.env") == "$nodes" ]]; then
            hosts_add
            say "already running in $DIR ($nodes node(s))"
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        say "running with another node count: restarting with $nodes node(s)"
        cmd_stop
    fi
    stop_daemons # leftovers of a cluster that died halfway
    mkdir -p "$DIR"
    chmod 0755 "$DIR"
    runuser -u slurm -- test -x "$DIR" ||
        die "the user slurm cannot enter $DIR (a parent folder is private): use a folder under /tmp"
    port=$(pick_ports)
    write_config "$nodes" "$cpus" "$port"
    hosts_add
    start_munge
    start_slurm
    wait_idle
    say "$nodes node(s) idle: $(node_list) ($cpus CPUs, 2 fake GPUs each); logs in $DIR/log"
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop_daemons() {
    local node
    for node in "${NODE_NAMES[@]}"; do
        stop_pid "$DIR/run/slurmd-$node.pid" slurmd
    done
    stop_pid "$DIR/run/slurmctld.pid" slurmctld
    stop_pid "$DIR/munge/munged.pid" munged
}

cmd_stop() {
    local i jobs
    export SLURM_CONF=$DIR/slurm.conf
    if [[ -f $SLURM_CONF ]] && pid_alive "$DIR/run/slurmctld.pid" slurmctld; then
        jobs=$(squeue -h -o '%A' 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086 # one job id per word
            scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 150; i++)); do
                [[ -z $(squeue -h -o '%A' 2>/dev/null) ]] && break
                sleep 0.1
            done
        fi
    fi
    stop_daemons
    hosts_remove
    say "stopped the cluster in $DIR"
}

report_daemon() {
    local label=$1 pidfile=$2 name=$3
    if pid_alive "$pidfile" "$name"; then
        echo "$label: pid $(<"$pidfile")"
    else
        echo "$label: not running"
        return 1
    fi
}

cmd_status() {
    export SLURM_CONF=$DIR/slurm.conf
    local node ok=0
    if [[ -z $(node_list) ]]; then
        echo "no cluster configured in $DIR"
        return 1
    fi
    for node in $(node_list); do
        report_daemon "slurmd $node" "$DIR/run/slurmd-$node.pid" slurmd || ok=1
    done
    report_daemon slurmctld "$DIR/run/slurmctld.pid" slurmctld || ok=1
    report_daemon munged "$DIR/munge/munged.pid" munged || ok=1
    if [[ $ok -eq 0 ]]; then
        sinfo -N -o '%N %T %c %G'
    fi
    return "$ok"
}

main() {
    local cmd=${1:-}
    [[ -n $cmd ]] || usage 2
    shift
    local nodes=1 cpus
    cpus=$(nproc)
    DIR=${ALEXNET_SLURM_DIR:-/tmp/alexnet-slurm}
    while [[ $# -gt 0 ]]; do
        case $1 in
            --nodes) nodes=${2:?--nodes needs a value}; shift 2 ;;
            --cpus) cpus=${2:?--cpus needs a value}; shift 2 ;;
            --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
            -h | --help) usage 0 ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
    done
    [[ $DIR == /* ]] || DIR=$PWD/$DIR
    DIR=${DIR%/}
    case $cmd in
        start) cmd_start "$nodes" "$cpus" ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        env) echo "export SLURM_CONF=$DIR/slurm.conf" ;;
        install) install_packages ;;
        -h | --help | help) usage 0 ;;
        *) die "unknown command '$cmd' (start, stop, status, env, install)" ;;
    esac
}

# Sourced (the script's tests call its functions), it defines them and runs nothing.
[[ ${BASH_SOURCE[0]} != "$0" ]] || main "$@"
