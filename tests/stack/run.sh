#!/usr/bin/env bash
# CI driver for the team stack: install (if needed), up on free ports in a fresh state directory,
# pytest tests/stack, and ALWAYS down (trap); then check that no recorded PID and no listening
# port is left. Prints the measured times and the stack's memory (RSS sum). Run it with the
# project's virtual environment active (it installs the stack's packages into it).
#   tests/stack/run.sh            # SKIP_INSTALL=1 to skip `deploy/stack.py install`
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
STACK=(python "$REPO/deploy/stack.py")

export STACK_DIR=${STACK_DIR:-$(mktemp -d /tmp/stack-ci.XXXXXX)}
export STACK_ENV_FILE=${STACK_ENV_FILE:-$STACK_DIR.env}
chmod 0711 "$STACK_DIR"   # the postgres user must traverse it

. "$REPO/tests/stack_ports.sh"
stack_ports 20000 26000   # tests/cluster/run.sh: 26000-32000

PIDS=() PORTS=()
finish() {
    local rc=$? bad=0 p
    # the PIDs and every port they listen on (the OSD picks its own ports), recorded before down
    for f in "$STACK_DIR"/run/*.pid; do [[ -s $f ]] && PIDS+=("$(head -n1 "$f")"); done
    for p in "${PIDS[@]}"; do
        while read -r port; do PORTS+=("$port"); done < <(ss -ltnpH 2>/dev/null | grep "pid=$p," | awk '{print $4}' | sed 's/.*://')
    done
    PORTS+=("$STACK_PG_PORT" "$STACK_MON_PORT" "$STACK_RGW_PORT" "$STACK_MLFLOW_PORT")
    local t0=$SECONDS
    "${STACK[@]}" down || bad=1
    echo "run.sh: down took $((SECONDS - t0)) s"
    for p in "${PIDS[@]}"; do
        if [[ -e /proc/$p ]]; then echo "run.sh: pid $p still running after down" >&2; bad=1; fi
    done
    # on the stack's address: tests/cluster/run.sh may run a stack of its own beside, on its bridge's address
    for p in "${PORTS[@]}"; do
        if ss -ltnH "src ${STACK_HOST:-127.0.0.1} and sport = :$p" | grep -q .; then
            echo "run.sh: port $p still listening after down" >&2; bad=1
        fi
    done
    if ((bad)); then echo "run.sh: down left something behind" >&2; rc=1
    else echo "run.sh: down left no process and no listening port (${#PIDS[@]} pids, ports ${PORTS[*]})"; fi
    if ((rc == 0)) && [[ -z ${KEEP_STACK_DIR:-} ]]; then rm -rf "$STACK_DIR" "$STACK_ENV_FILE"; fi
    exit "$rc"
}

if [[ -z ${SKIP_INSTALL:-} ]]; then
    t0=$SECONDS
    "${STACK[@]}" install
    echo "run.sh: install took $((SECONDS - t0)) s"
fi

trap finish EXIT
t0=$SECONDS
"${STACK[@]}" up
echo "run.sh: up (cold) took $((SECONDS - t0)) s"
"${STACK[@]}" up | grep -q "already up"   # idempotent
"${STACK[@]}" status

rss() {  # RSS in MB of a process group (mlflow: the CLI, uvicorn and its workers) or of a postmaster and its children
    local pid=$1
    ps -eo pid=,ppid=,pgid=,rss= | awk -v p="$pid" '$1==p || $2==p || $3==p {s+=$4} END {printf "%d", s/1024}'
}
total=0
for c in postgres ceph-mon ceph-osd radosgw mlflow; do
    m=$(rss "$(head -n1 "$STACK_DIR/run/$c.pid")")
    total=$((total + m))
    echo "run.sh: rss $c ${m} MB"
done
echo "run.sh: rss total ${total} MB (after up, before the tests)"

t0=$SECONDS
# --tb=short: the long format prints the failing test's arguments, i.e. the env and secrets fixtures
# STACK_TESTS: a subset, while developing; split on spaces, so name tests by node ID, not `-k 'a or b'`
python -m pytest ${STACK_TESTS:-tests/stack} -n 0 -q -rP -p no:cacheprovider --tb=short
echo "run.sh: tests took $((SECONDS - t0)) s"
# the backup that docs/team.md describes: pg_dump of the tracking and user stores, then a look inside
PGBIN=${STACK_PG_BIN:-/usr/lib/postgresql/15/bin}
for db in mlflow mlflow_auth; do
    PGPASSFILE=$STACK_DIR/secrets/pgpass "$PGBIN/pg_dump" -h 127.0.0.1 -p "$STACK_PG_PORT" -U mlflow -Fc \
        -f "$STACK_DIR/$db.dump" "$db"
done
grep -q "TABLE DATA public experiments" <<< "$("$PGBIN/pg_restore" -l "$STACK_DIR/mlflow.dump")"
grep -q "TABLE DATA public users" <<< "$("$PGBIN/pg_restore" -l "$STACK_DIR/mlflow_auth.dump")"
echo "run.sh: pg_dump backups: $(du -k "$STACK_DIR/mlflow.dump" | cut -f1) kB + $(du -k "$STACK_DIR/mlflow_auth.dump" | cut -f1) kB"
for c in postgres ceph-mon ceph-osd radosgw mlflow; do
    echo "run.sh: rss after tests $c $(rss "$(head -n1 "$STACK_DIR/run/$c.pid")") MB"
done
