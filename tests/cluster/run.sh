#!/usr/bin/env bash
# CI driver for the two-node Ray cluster (needs root): a bridge and two network namespaces on a
# private /24 of their own, the team stack (deploy/stack.py) listening on the bridge's address, a
# Ray head in namespace A and a Ray worker in namespace B (tests/cluster/nodes.py), pytest
# tests/cluster, and ALWAYS (trap) the Ray nodes stopped by PID, `deploy/stack.py down`, the
# namespaces, veths and bridge deleted, then a check that nothing it started is left.
# Traffic stays on loopback and on the run's own /24: the namespaces have no other route.
#   tests/cluster/run.sh          # SKIP_INSTALL=1: skip installing the stack's and the cluster's packages
#   CLUSTER_TESTS='tests/cluster/test_ray_nodes.py::test_x ...'   a subset (node IDs, split on spaces)
#   CLUSTER_COMMAND='python tests/cluster/measure_quick_table.py'   a measurement instead of pytest
#   KEEP_CLUSTER_DIR=1            keep the temporary folder (logs) even when everything passed
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
STACK=$REPO/deploy/stack.py
NODES=$REPO/tests/cluster/nodes.py
T_START=$SECONDS

[[ $EUID -eq 0 ]] || { echo "cluster: needs root (ip netns, bridge)" >&2; exit 1; }
PY=$(command -v python)
VENV=$("$PY" -c 'import sys; print(sys.prefix)')

# ---------------------------------------------------------------- packages
if [[ -z ${SKIP_INSTALL:-} ]]; then
    t0=$SECONDS
    # the stack's (tests/stack/run.sh has usually installed them already)
    if ! { dpkg -s radosgw ceph-mon ceph-osd postgresql > /dev/null 2>&1 \
        && "$PY" -c 'import boto3, dvc_s3, flask_wtf, psycopg2' 2> /dev/null; }; then
        "$PY" "$STACK" install
    fi
    # the cluster extra of pyproject.toml, without reinstalling the project
    if ! "$PY" -c 'import ray, optuna, psycopg2, dvc_s3' 2> /dev/null; then
        mapfile -t reqs < <("$PY" -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["cluster"]))')
        "$PY" -m pip install -q "${reqs[@]}"
    fi
    echo "cluster: install took $((SECONDS - t0)) s"
fi

T_UP=$SECONDS
# ---------------------------------------------------------------- names, addresses
ROOT=$(mktemp -d /tmp/cluster-ci.XXXXXX)
chmod 0711 "$ROOT"   # the postgres user must traverse it to the stack's state
SUF='' NET=''
for ((i = 0; i < 50; i++)); do   # a suffix and a /24 nobody uses (bounded)
    s=$(head -c 3 /dev/urandom | od -An -tx1 | tr -d ' \n')
    n=10.77.$((RANDOM % 250)).
    if ip link show "clbr$s" > /dev/null 2>&1 || [[ -e /run/netns/cl$s-a || -e /run/netns/cl$s-b ]]; then continue; fi
    # no route into or around the /24 (the default route aside), no address in it
    if [[ -n $(ip -4 route show root "${n}0/24") ]] || ip -4 route show match "${n}0/24" | grep -qv '^default'; then continue; fi
    if ip -4 addr show | grep -q "inet ${n//./\\.}"; then continue; fi
    SUF=$s NET=$n
    break
done
[[ -n $SUF ]] || { echo "cluster: no free name/subnet found" >&2; exit 1; }
BR=clbr$SUF NS_A=cl$SUF-a NS_B=cl$SUF-b
BRIDGE_IP=${NET}254 HEAD_IP=${NET}1 WORKER_IP=${NET}2

export CLUSTER_ROOT=$ROOT CLUSTER_SUBNET=${NET}0/24 CLUSTER_BRIDGE=$BR CLUSTER_BRIDGE_IP=$BRIDGE_IP
export CLUSTER_HEAD_NS=$NS_A CLUSTER_WORKER_NS=$NS_B CLUSTER_HEAD_IP=$HEAD_IP CLUSTER_WORKER_IP=$WORKER_IP
export CLUSTER_RAY_ADDRESS=$HEAD_IP:6379 CLUSTER_RAY_TOKEN_PATH=$ROOT/ray/auth_token CLUSTER_VENV=$VENV
export CLUSTER_NODE_CPUS=${CLUSTER_NODE_CPUS:-1} CLUSTER_OBJECT_STORE_BYTES=${CLUSTER_OBJECT_STORE_BYTES:-300000000}
export STACK_DIR=$ROOT/stack STACK_ENV_FILE=$ROOT/stack.env STACK_HOST=$BRIDGE_IP
# Ray's default places, which nothing here may write to: checked at the end
RAY_DEFAULT_DIRS=("$HOME/.ray" /tmp/ray)
declare -A EXISTED=()
for d in "${RAY_DEFAULT_DIRS[@]}"; do [[ -e $d ]] && EXISTED[$d]=1; done

. "$REPO/tests/stack_ports.sh"

# ---------------------------------------------------------------- teardown (always, from here on)
starttime() {  # field 22 of /proc/PID/stat (counted after the command name, which may hold spaces)
    sed 's/.*) //' "/proc/$1/stat" 2> /dev/null | cut -d' ' -f20
}
record_pids() {  # "pid starttime" of every process in both namespaces, appended to $ROOT/pids
    local ns p
    for ns in "$NS_A" "$NS_B"; do
        [[ -e /run/netns/$ns ]] || continue
        for p in $(ip netns pids "$ns" 2> /dev/null); do
            echo "$p $(starttime "$p")" >> "$ROOT/pids"
        done
    done
}

finish() {
    local rc=$? bad=0 ns p st dev t0=$SECONDS i
    T_DOWN=$SECONDS
    trap - EXIT INT TERM
    set +e
    echo "cluster: teardown (exit status so far $rc)"
    record_pids
    for ns in "$NS_B" "$NS_A"; do   # worker first, then the head (and any driver left in it)
        [[ -e /run/netns/$ns ]] || continue
        if [[ -n $(ip netns pids "$ns" 2> /dev/null) ]]; then
            "$PY" "$NODES" stop "$([[ $ns == "$NS_A" ]] && echo head || echo worker)"
        fi
        p=$(ip netns pids "$ns" 2> /dev/null)
        if [[ -n $p ]]; then   # nodes.py failed: KILL by PID, bounded wait
            echo "cluster: KILL left in $ns: $p"
            # shellcheck disable=SC2086
            kill -KILL $p 2> /dev/null
            for ((i = 0; i < 50; i++)); do [[ -z $(ip netns pids "$ns" 2> /dev/null) ]] && break; sleep 0.2; done
        fi
    done
    echo "cluster: ray nodes down in $((SECONDS - t0)) s"
    # neither the Ray token nor a stack credential in Ray's logs and session files (names only)
    if [[ -s $CLUSTER_RAY_TOKEN_PATH ]]; then "$PY" "$NODES" scan-logs || bad=1; fi
    # the stack (its own checks are tests/stack's; here: its recorded PIDs end)
    local stack_pids=()
    for f in "$STACK_DIR"/run/*.pid; do [[ -s $f ]] && stack_pids+=("$(head -n1 "$f")"); done
    if [[ -d $STACK_DIR ]]; then
        t0=$SECONDS
        "$PY" "$STACK" down || bad=1
        echo "cluster: stack down took $((SECONDS - t0)) s"
    fi
    for dev in "${BR}" "v$SUF-a-br" "v$SUF-b-br"; do ip link del "$dev" 2> /dev/null; done
    for ns in "$NS_A" "$NS_B"; do [[ -e /run/netns/$ns ]] && ip netns del "$ns"; done
    for ((i = 0; i < 50; i++)); do   # veth pairs go with their namespace, asynchronously
        ip -o link show | grep -qE "(clbr|v)$SUF" || break
        sleep 0.2
    done
    # checks: nothing recorded still runs, no namespace, link or address of this run is left
    if [[ -s $ROOT/pids ]]; then
        while read -r p st; do
            if [[ -e /proc/$p && $(starttime "$p") == "$st" ]]; then
                echo "cluster: pid $p still running after teardown" >&2; bad=1
            fi
        done < <(sort -u "$ROOT/pids")
    fi
    for p in "${stack_pids[@]}"; do
        if [[ -e /proc/$p ]]; then echo "cluster: stack pid $p still running after down" >&2; bad=1; fi
    done
    if ip netns list | grep -q "cl$SUF"; then echo "cluster: namespace left: $(ip netns list | grep "cl$SUF")" >&2; bad=1; fi
    if ip -o link show | grep -qE "(clbr|v)$SUF"; then echo "cluster: link left: $(ip -o link show | grep -E "(clbr|v)$SUF")" >&2; bad=1; fi
    if ip -4 addr show | grep -q "inet ${BRIDGE_IP//./\\.}/"; then echo "cluster: address $BRIDGE_IP left" >&2; bad=1; fi
    for d in "${RAY_DEFAULT_DIRS[@]}"; do
        if [[ -e $d && -z ${EXISTED[$d]:-} ]]; then echo "cluster: $d was created (Ray wrote outside $ROOT)" >&2; bad=1; fi
    done
    if ((bad)); then echo "cluster: teardown left something behind" >&2; rc=1
    else echo "cluster: teardown left no process, namespace, link or address ($(sort -u "$ROOT/pids" 2> /dev/null | wc -l) ray pids recorded)"; fi
    echo "cluster: down took $((SECONDS - T_DOWN)) s; total $((SECONDS - T_START)) s"
    if ((rc == 0)) && [[ -z ${KEEP_CLUSTER_DIR:-} ]]; then rm -rf "$ROOT"; else echo "cluster: kept $ROOT"; fi
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

stack_ports 26000 32000   # tests/stack/run.sh: 20000-26000

# ---------------------------------------------------------------- network
t0=$SECONDS
ip link add "$BR" type bridge
ip addr add "$BRIDGE_IP/24" dev "$BR"
ip link set "$BR" up
for pair in "a $NS_A $HEAD_IP" "b $NS_B $WORKER_IP"; do
    read -r x ns addr <<< "$pair"
    ip netns add "$ns"
    ip link add "v$SUF-$x" type veth peer name "v$SUF-$x-br"
    ip link set "v$SUF-$x" netns "$ns"
    ip link set "v$SUF-$x-br" master "$BR" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$addr/24" dev "v$SUF-$x"
    ip -n "$ns" link set "v$SUF-$x" up
done
echo "cluster: bridge $BR $BRIDGE_IP, head $NS_A $HEAD_IP, worker $NS_B $WORKER_IP ($((SECONDS - t0)) s)"

# ---------------------------------------------------------------- the stack on the bridge
t0=$SECONDS
"$PY" "$STACK" up
echo "cluster: stack up on $BRIDGE_IP took $((SECONDS - t0)) s"
# Optuna's schema made once, before any worker: several creating it at once crash (upstream)
(
    set -a
    # shellcheck disable=SC1090
    . "$STACK_ENV_FILE"
    "$PY" -c 'import os, optuna; optuna.storages.RDBStorage(os.environ["OPTUNA_STORAGE"])'
)
echo "cluster: optuna storage ready"

# ---------------------------------------------------------------- Ray
mkdir -p "$ROOT/ray"
# Ray's token (256 bits, as `ray get-auth-token --generate` makes it), in a 0600 file that every Ray
# process reads through RAY_AUTH_TOKEN_PATH (nodes.py): in no environment, on no command line
(umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$CLUSTER_RAY_TOKEN_PATH")
# for a person reproducing a run by hand (KEEP_CLUSTER_DIR=1): `. $ROOT/cluster.env`
{
    echo "# written by tests/cluster/run.sh"
    for v in CLUSTER_ROOT CLUSTER_SUBNET CLUSTER_BRIDGE CLUSTER_BRIDGE_IP CLUSTER_HEAD_NS CLUSTER_WORKER_NS \
        CLUSTER_HEAD_IP CLUSTER_WORKER_IP CLUSTER_RAY_ADDRESS CLUSTER_RAY_TOKEN_PATH CLUSTER_VENV \
        CLUSTER_NODE_CPUS CLUSTER_OBJECT_STORE_BYTES STACK_DIR STACK_ENV_FILE; do
        printf "export %s='%s'\n" "$v" "${!v}"
    done
} > "$ROOT/cluster.env"
chmod 0600 "$ROOT/cluster.env"
for node in head worker; do
    "$PY" "$NODES" start "$node"
    record_pids
done
for node in head worker; do
    echo "cluster: rss $node $("$PY" "$NODES" rss "$node") MB ($(ip netns pids "$([[ $node == head ]] && echo "$NS_A" || echo "$NS_B")" | wc -l) processes, after start)"
done
echo "cluster: up (network, stack, ray) took $((SECONDS - T_UP)) s"

# ---------------------------------------------------------------- tests
t0=$SECONDS
# --tb=short: the long format would print fixture values; CLUSTER_TESTS split on spaces (node IDs)
# shellcheck disable=SC2086
if [[ -n ${CLUSTER_COMMAND:-} ]]; then   # a measurement instead of the tests (docs/cluster.md)
    $CLUSTER_COMMAND
else
    python -m pytest ${CLUSTER_TESTS:-tests/cluster} -n 0 -q -rP -p no:cacheprovider --tb=short
fi
echo "cluster: tests took $((SECONDS - t0)) s"
record_pids
