#!/usr/bin/env bash
# deploy/stack.sh -- a team's shared services on ONE machine, all bound to 127.0.0.1 (or STACK_HOST):
#
#   PostgreSQL 15   MLflow's tracking store, MLflow's user store, an `optuna` database
#   Ceph RGW        S3 API (ceph-mon + one memstore ceph-osd + radosgw, cephx auth) with two
#                   buckets: MLflow's artifacts and the DVC remote
#   mlflow server   tracking server with --app-name basic-auth, proxying artifacts to RGW
#                   (clients need only MLFLOW_TRACKING_URI + user/password)
#
# Usage
#   deploy/stack.sh install     apt packages (radosgw ceph-mon ceph-osd, postgresql if missing) and,
#                               into the ACTIVE virtual environment: dvc[s3], boto3 (pinned to the
#                               botocore that aiobotocore accepts), mlflow[auth]<3.18 (Flask-WTF), psycopg2-binary
#   deploy/stack.sh up          start what is not running (idempotent), wait until each service
#                               answers, write the env file; exit 0 when everything is up
#   deploy/stack.sh down        stop every process by the PID recorded at `up` (TERM, bounded wait,
#                               KILL); the data stays in the state directory
#   deploy/stack.sh status      one line per component: up/down, port, PID; exit 0 only if all up
#   deploy/stack.sh dvc-remote [DIR]   in the DVC checkout DIR (default: .), from the env file:
#                               remote `team` as default, its URL and endpointurl in .dvc/config,
#                               the S3 keys ONLY in .dvc/config.local (git-ignored by DVC)
#   deploy/stack.sh restart mlflow|postgres   stop that one component by its PID and start it
#                               again (the fault test restarts them in the middle of a training)
#   deploy/stack.sh destroy     `down`, then delete the state directory and the env file
#
# Environment (all optional)
#   STACK_DIR          state: data, logs, PIDs, secrets      (default: deploy/.stack, git-ignored)
#   STACK_ENV_FILE     env file written by `up`, mode 0600    (default: deploy/.env, git-ignored)
#   STACK_PG_PORT      PostgreSQL                             (default 5433)
#   STACK_MON_PORT     ceph-mon (msgr v2)                      (default 3300)
#   STACK_RGW_PORT     RADOS Gateway (S3)                     (default 7480)
#   STACK_MLFLOW_PORT  MLflow tracking server and UI           (default 5000)
#   STACK_HOST         PostgreSQL, RGW, MLflow listen here; the env file's URLs name it (default 127.0.0.1)
#   STACK_MLFLOW_WORKERS  uvicorn workers                      (default 2)
#   STACK_MEMSTORE_BYTES  memstore OSD capacity                (default 4 GiB; data lives in RAM)
#   STACK_PYTHON       python with mlflow/boto3/psycopg2      (default: python3 on PATH, i.e. the venv)
#   The ports and STACK_HOST are recorded in the state directory at the first `up`; later commands use those.
#
# The env file (`. deploy/.env`) exports: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME/PASSWORD
# (the `pipeline` user), STACK_READER_USERNAME/PASSWORD (read-only), STACK_ADMIN_USERNAME/PASSWORD,
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL,
# AWS_DEFAULT_REGION, AWS_REQUEST_CHECKSUM_CALCULATION/AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
# (RGW 16 rejects the newer botocore default checksums), DVC_REMOTE_URL, STACK_ARTIFACT_BUCKET,
# STACK_DVC_BUCKET, OPTUNA_STORAGE (postgresql+psycopg2://optuna:...@127.0.0.1:PORT/optuna).
#
# Secrets: generated at the first `up` (python secrets.token_urlsafe; the S3 keys by radosgw-admin),
# kept in $STACK_DIR/secrets (0700) and the env file (0600); never printed, never on a command
# line: PostgreSQL passwords are sent as SCRAM verifiers on psql's stdin, MLflow reaches
# PostgreSQL through a 0600 PGPASSFILE (the URIs carry no password), the MLflow admin password is
# passed in MLFLOW_AUTH_ADMIN_PASSWORD, the DVC keys are written through dvc's Python entry point.
# The S3 credentials reach the mlflow server in its environment (readable by root and its owner).
#
# Pointing at a team's EXISTING servers instead (nothing in the project assumes this stack):
#   on the server host, with a managed PostgreSQL and AWS S3 (or any S3 API):
#     export MLFLOW_BACKEND_STORE_URI='postgresql+psycopg2://mlflow@db.example:5432/mlflow'
#     export PGPASSFILE=~/.pgpass            # db.example:5432:*:mlflow:PASSWORD, mode 0600
#     export MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini   # [mlflow] default_permission = READ,
#           # database_uri = postgresql+psycopg2://mlflow@db.example:5432/mlflow_auth,
#           # admin_username = ..., authorization_function = mlflow.server.auth:authenticate_request_basic_auth
#     export MLFLOW_AUTH_ADMIN_PASSWORD=...  MLFLOW_FLASK_SERVER_SECRET_KEY=...
#     export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_DEFAULT_REGION=...
#     # (and MLFLOW_S3_ENDPOINT_URL=https://... for a non-AWS S3 API)
#     mlflow server --app-name basic-auth --host 127.0.0.1 --port 5000 \
#         --artifacts-destination s3://TEAM-BUCKET/mlartifacts     # behind a TLS reverse proxy;
#         # binding another address than loopback needs --allowed-hosts
#   on each client: write the same variables as the env file by hand:
#     MLFLOW_TRACKING_URI=https://mlflow.example, MLFLOW_TRACKING_USERNAME/PASSWORD,
#     DVC_REMOTE_URL=s3://TEAM-BUCKET/dvc, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and
#     AWS_ENDPOINT_URL only for a non-AWS S3), OPTUNA_STORAGE=postgresql+psycopg2://...,
#   then `deploy/stack.sh dvc-remote` works the same (it skips endpointurl when AWS_ENDPOINT_URL is unset).
#
# Every wait loop is bounded; every process is started here, recorded by PID and stopped by PID.
set -euo pipefail
umask 077

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR=${STACK_DIR:-$REPO/deploy/.stack}
STACK_ENV_FILE=${STACK_ENV_FILE:-$REPO/deploy/.env}
PGBIN=${STACK_PG_BIN:-/usr/lib/postgresql/15/bin}
PY=${STACK_PYTHON:-python3}
COMPONENTS=(postgres ceph-mon ceph-osd radosgw mlflow)
ARTIFACT_BUCKET=mlflow-artifacts
DVC_BUCKET=dvc-remote
ADMIN_USER=stack-admin
PIPELINE_USER=pipeline
READER_USER=reader

say() { echo "stack: $*"; }
is_loopback() { [[ $1 == 127.0.0.1 ]]; }
die() { echo "stack: $*" >&2; exit 1; }

# ---------------------------------------------------------------- state, ports
load_conf() {
    STACK_DIR=$(mkdir -p "$STACK_DIR" && cd "$STACK_DIR" && pwd)
    chmod 0711 "$STACK_DIR"          # the postgres user must traverse it to reach its data
    LOGS=$STACK_DIR/logs RUN=$STACK_DIR/run SECRETS=$STACK_DIR/secrets
    PGDIR=$STACK_DIR/pg CEPH=$STACK_DIR/ceph MLDIR=$STACK_DIR/mlflow
    mkdir -p "$LOGS" "$RUN" "$SECRETS" "$CEPH" "$MLDIR"
    chmod 0700 "$SECRETS"
    if [[ -f $STACK_DIR/ports ]]; then
        # shellcheck disable=SC1091
        . "$STACK_DIR/ports"
    else
        PG_PORT=${STACK_PG_PORT:-5433} MON_PORT=${STACK_MON_PORT:-3300}
        RGW_PORT=${STACK_RGW_PORT:-7480} MLFLOW_PORT=${STACK_MLFLOW_PORT:-5000}
        HOST=${STACK_HOST:-127.0.0.1}
        printf 'PG_PORT=%s\nMON_PORT=%s\nRGW_PORT=%s\nMLFLOW_PORT=%s\nHOST=%s\n' \
            "$PG_PORT" "$MON_PORT" "$RGW_PORT" "$MLFLOW_PORT" "$HOST" > "$STACK_DIR/ports"
    fi
    # a state directory from before STACK_HOST existed was made for loopback
    HOST=${HOST:-127.0.0.1}
    if [[ -n ${STACK_HOST:-} && $STACK_HOST != "$HOST" ]]; then
        echo "stack: STACK_HOST=$STACK_HOST ignored: $STACK_DIR serves $HOST (recorded at its first up)" >&2
    fi
    [[ $HOST =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "STACK_HOST: an IPv4 address, got '$HOST'"
    MLFLOW_WORKERS=${STACK_MLFLOW_WORKERS:-2}
    MEMSTORE_BYTES=${STACK_MEMSTORE_BYTES:-4294967296}
    CEPHCONF=$CEPH/ceph.conf
}

port_of() {
    case $1 in
        postgres) echo "$PG_PORT" ;; ceph-mon) echo "$MON_PORT" ;; radosgw) echo "$RGW_PORT" ;;
        mlflow) echo "$MLFLOW_PORT" ;; *) echo - ;;
    esac
}
log_of() {
    case $1 in
        postgres) echo "$PGDIR/postgres.log" ;; ceph-mon) echo "$LOGS/ceph-mon.a.log" ;;
        ceph-osd) echo "$LOGS/ceph-osd.0.log" ;; radosgw) echo "$LOGS/ceph-client.rgw.a.log" ;;
        mlflow) echo "$LOGS/mlflow.log" ;;
    esac
}
# what /proc/PID/comm must start with (guards against a reused PID)
comm_of() {
    case $1 in
        postgres) echo postgres ;; ceph-mon) echo ceph-mon ;; ceph-osd) echo ceph-osd ;;
        radosgw) echo radosgw ;; mlflow) echo mlflow ;;
    esac
}

pid_of() {  # the recorded PID of a component if that process is alive, else nothing
    local f=$RUN/$1.pid pid comm
    [[ -s $f ]] || return 0
    pid=$(head -n1 "$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm == "$(comm_of "$1")"* ]] && echo "$pid"
    return 0
}

secret() {  # secret NAME: read it, generating it first if missing
    local f=$SECRETS/$1
    if [[ ! -s $f ]]; then
        "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))' > "$f"
        chmod 0600 "$f"
    fi
    cat "$f"
}

wait_for() {  # wait_for COMPONENT TRIES CMD...: run CMD every second, at most TRIES times
    local comp=$1 tries=$2 i
    shift 2
    for ((i = 0; i < tries; i++)); do
        if "$@" > /dev/null 2>&1; then return 0; fi
        if [[ -z $(pid_of "$comp") ]]; then
            fail "$comp" "exited during start"
        fi
        sleep 1
    done
    fail "$comp" "did not answer within ${tries} s"
}

fail() {
    echo "stack: $1 FAILED ($2); see $(log_of "$1")" >&2
    do_down > /dev/null 2>&1 || true
    exit 1
}

http_ok() {  # http_ok URL: any HTTP answer below 500 from a URL on loopback or STACK_HOST
    "$PY" - "$1" "$HOST" <<'EOF'
import sys, urllib.request, urllib.error
url, host = sys.argv[1:3]
assert url.startswith(("http://127.0.0.1:", f"http://{host}:"))
try:
    urllib.request.urlopen(url, timeout=3)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code < 500 else 1)
EOF
}

# ---------------------------------------------------------------- PostgreSQL
as_pg() {
    if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

scram() {  # SCRAM-SHA-256 verifier of the password on stdin (so only the hash reaches the server)
    "$PY" -c '
import base64, hashlib, hmac, os, sys
pw = sys.stdin.readline().rstrip("\n").encode()
salt, it = os.urandom(16), 4096
salted = hashlib.pbkdf2_hmac("sha256", pw, salt, it)
ck = hmac.new(salted, b"Client Key", "sha256").digest()
sk = hmac.new(salted, b"Server Key", "sha256").digest()
b = lambda x: base64.b64encode(x).decode()
print(f"SCRAM-SHA-256${it}:{b(salt)}${b(hashlib.sha256(ck).digest())}:{b(sk)}")'
}

pg_psql() { as_pg "$PGBIN/psql" -h "$PGDIR/run" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -q -X; }

start_postgres() {
    if [[ -n $(pid_of postgres) ]]; then say "postgres already running"; return; fi
    mkdir -p "$PGDIR"
    if [[ $EUID -eq 0 ]]; then chown postgres: "$PGDIR"; fi
    chmod 0700 "$PGDIR"
    if ! as_pg test -x "$PGDIR"; then die "postgres: the postgres user cannot reach $PGDIR (parent directories need o+x)"; fi
    if [[ ! -f $PGDIR/data/PG_VERSION ]]; then
        as_pg "$PGBIN/initdb" -D "$PGDIR/data" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
            --no-locale -E UTF8 > "$PGDIR/initdb.log" 2>&1 || { echo "stack: postgres initdb FAILED; see $PGDIR/initdb.log" >&2; exit 1; }
        as_pg mkdir -p "$PGDIR/run"
        as_pg tee -a "$PGDIR/data/postgresql.conf" > /dev/null <<EOF
# deploy/stack.sh
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$PGDIR/run'
password_encryption = 'scram-sha-256'
shared_buffers = 64MB
max_connections = 100
log_min_error_statement = panic
EOF
        if ! is_loopback "$HOST"; then  # clients on STACK_HOST's /24 (initdb admits loopback only)
            printf '# deploy/stack.sh: STACK_HOST\nhost all all %s/24 scram-sha-256\n' "${HOST%.*}.0" \
                | as_pg tee -a "$PGDIR/data/pg_hba.conf" > /dev/null
        fi
    fi
    as_pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/postgres.log" -w -t 60 start > /dev/null 2>&1 \
        || fail postgres "pg_ctl start failed"
    head -n1 "$PGDIR/data/postmaster.pid" > "$RUN/postgres.pid"
    wait_for postgres 60 "$PGBIN/pg_isready" -q -h "$HOST" -p "$PG_PORT"
    if [[ ! -f $PGDIR/roles-done ]]; then
        local v_mlflow v_optuna
        v_mlflow=$(secret pg_mlflow | scram) v_optuna=$(secret pg_optuna | scram)
        pg_psql <<EOF || fail postgres "creating roles and databases failed"
CREATE ROLE mlflow LOGIN PASSWORD '$v_mlflow';
CREATE ROLE optuna LOGIN PASSWORD '$v_optuna';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE optuna OWNER optuna;
REVOKE CONNECT ON DATABASE mlflow, mlflow_auth FROM PUBLIC;
REVOKE CONNECT ON DATABASE optuna FROM PUBLIC;
EOF
        touch "$PGDIR/roles-done"
    fi
    # libpq reads the password from here: no password in any URI or command line
    printf '%s:%s:*:mlflow:%s\n' "$HOST" "$PG_PORT" "$(secret pg_mlflow)" > "$SECRETS/pgpass"
    chmod 0600 "$SECRETS/pgpass"
    say "postgres up on $HOST:$PG_PORT (pid $(pid_of postgres))"
}

# ---------------------------------------------------------------- Ceph: mon, osd, rgw
ceph_() { ceph -c "$CEPHCONF" -n client.admin --connect-timeout 20 "$@"; }

ceph_conf() {
    local fsid
    fsid=$(cat "$CEPH/fsid")
    cat > "$CEPHCONF" <<EOF
# written by deploy/stack.sh
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$MON_PORT]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = $CEPH/keyring.\$name
run_dir = $CEPH/run
admin_socket = $CEPH/run/\$name.asok
pid_file = $CEPH/run/\$name.pid
log_file = $LOGS/ceph-\$name.log
log_to_stderr = false
err_to_stderr = true
mon_cluster_log_file = $LOGS/ceph-cluster.log
mon_data = $CEPH/mon/\$name
osd_data = $CEPH/osd/\$name
osd_objectstore = memstore
# SIGTERM must unmount the store: memstore writes its data to osd_data only then
osd_fast_shutdown = false
memstore_device_bytes = $MEMSTORE_BYTES
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
osd_crush_chooseleaf_type = 0
mon_warn_on_pool_no_redundancy = false
auth_allow_insecure_global_id_reclaim = false

[client.rgw.a]
rgw_frontends = beast endpoint=$HOST:$RGW_PORT
rgw_data = $CEPH/rgw
# debug level 1 writes an access log line per request, with the access key id of presigned URLs
debug_rgw = 0/5
log_file = $LOGS/ceph-client.rgw.a.log
EOF
}

spawn() {  # spawn COMPONENT LOG CMD...: start CMD in its own session, record its PID
    local comp=$1 log=$2
    shift 2
    setsid "$@" >> "$log" 2>&1 < /dev/null &
    echo $! > "$RUN/$comp.pid"
}

start_ceph() {
    mkdir -p "$CEPH/run" "$CEPH/mon" "$CEPH/osd" "$CEPH/rgw"
    if [[ ! -f $CEPH/mon/mon.a/done ]]; then
        rm -rf "$CEPH/mon/mon.a" "$CEPH/osd"/* "$CEPH"/keyring.*
        local fsid
        fsid=$("$PY" -c 'import uuid; print(uuid.uuid4())')
        echo "$fsid" > "$CEPH/fsid"
        ceph_conf
        {
            ceph-authtool --create-keyring "$CEPH/keyring.mon.a" --gen-key -n mon. --cap mon 'allow *'
            ceph-authtool --create-keyring "$CEPH/keyring.client.admin" --gen-key -n client.admin \
                --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *'
            ceph-authtool "$CEPH/keyring.mon.a" --import-keyring "$CEPH/keyring.client.admin"
            monmaptool --create --addv a "[v2:127.0.0.1:$MON_PORT]" --fsid "$fsid" "$CEPH/monmap"
            ceph-mon -c "$CEPHCONF" --mkfs -i a --monmap "$CEPH/monmap" --keyring "$CEPH/keyring.mon.a"
        } > "$LOGS/ceph-setup.log" 2>&1 || fail ceph-mon "mkfs failed (see also $LOGS/ceph-setup.log)"
        touch "$CEPH/mon/mon.a/done"
    fi
    ceph_conf   # rewritten at each start: a changed setting takes effect at the next start
    if [[ -n $(pid_of ceph-mon) ]]; then say "ceph-mon already running"; else
        spawn ceph-mon "$LOGS/ceph-mon.out" ceph-mon -f -c "$CEPHCONF" -i a
        wait_for ceph-mon 60 ceph_ mon stat
        say "ceph-mon up on 127.0.0.1:$MON_PORT (pid $(pid_of ceph-mon))"
    fi
    if [[ ! -f $CEPH/osd/osd.0/done ]]; then
        local uuid
        uuid=$("$PY" -c 'import uuid; print(uuid.uuid4())')
        rm -rf "$CEPH/osd/osd.0"
        mkdir -p "$CEPH/osd/osd.0"
        {
            ceph_ osd new "$uuid"
            ceph-osd -c "$CEPHCONF" -i 0 --mkfs --mkkey --no-mon-config --osd-uuid "$uuid"
            ceph_ auth add osd.0 osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
                -i "$CEPH/keyring.osd.0"
        } >> "$LOGS/ceph-setup.log" 2>&1 || fail ceph-osd "mkfs failed (see also $LOGS/ceph-setup.log)"
        touch "$CEPH/osd/osd.0/done"
    fi
    if [[ -n $(pid_of ceph-osd) ]]; then say "ceph-osd already running"; else
        spawn ceph-osd "$LOGS/ceph-osd.out" ceph-osd -f -c "$CEPHCONF" -i 0
        wait_for ceph-osd 90 osd_up
        say "ceph-osd up (pid $(pid_of ceph-osd))"
    fi
    if [[ ! -s $CEPH/keyring.client.rgw.a ]]; then
        ceph_ auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' \
            -o "$CEPH/keyring.client.rgw.a" >> "$LOGS/ceph-setup.log" 2>&1 || fail radosgw "creating its key failed"
    fi
    if [[ -n $(pid_of radosgw) ]]; then say "radosgw already running"; else
        spawn radosgw "$LOGS/radosgw.out" radosgw -f -c "$CEPHCONF" -n client.rgw.a
        wait_for radosgw 120 http_ok "http://$HOST:$RGW_PORT/"
        say "radosgw up on $HOST:$RGW_PORT (pid $(pid_of radosgw))"
    fi
    if [[ ! -s $SECRETS/s3_secret_key ]]; then
        # radosgw-admin generates the keys; they go from its stdout straight into the secrets dir
        radosgw-admin -c "$CEPHCONF" -n client.admin user create --uid=team --display-name=team 2>> "$LOGS/ceph-setup.log" \
            | "$PY" -c '
import json, os, sys
k = json.load(sys.stdin)["keys"][0]
d = sys.argv[1]
for name, value in (("s3_access_key", k["access_key"]), ("s3_secret_key", k["secret_key"])):
    fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, (value + "\n").encode()); os.close(fd)' "$SECRETS" \
            || fail radosgw "creating the S3 user failed"
    fi
    s3_env
    "$PY" - "$ARTIFACT_BUCKET" "$DVC_BUCKET" <<'EOF' >> "$LOGS/ceph-setup.log" 2>&1 || fail radosgw "creating the buckets failed"
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for b in sys.argv[1:]:
    if b not in have:
        s3.create_bucket(Bucket=b)
        print("created bucket", b)
EOF
}

osd_up() { ceph_ osd stat -f json | "$PY" -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["num_up_osds"] >= 1 else 1)'; }

s3_env() {
    AWS_ACCESS_KEY_ID=$(cat "$SECRETS/s3_access_key") AWS_SECRET_ACCESS_KEY=$(cat "$SECRETS/s3_secret_key")
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
    export AWS_ENDPOINT_URL=http://$HOST:$RGW_PORT MLFLOW_S3_ENDPOINT_URL=http://$HOST:$RGW_PORT
    export AWS_DEFAULT_REGION=us-east-1
    export AWS_REQUEST_CHECKSUM_CALCULATION=when_required AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
}

# ---------------------------------------------------------------- MLflow
start_mlflow() {
    if [[ -n $(pid_of mlflow) ]]; then say "mlflow already running"; return; fi
    command -v mlflow > /dev/null || die "mlflow: not found on PATH (activate the venv; deploy/stack.sh install)"
    cat > "$MLDIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = postgresql+psycopg2://mlflow@$HOST:$PG_PORT/mlflow_auth
admin_username = $ADMIN_USER
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    s3_env
    local net=()   # MLflow's security middleware admits only loopback Host headers unless told otherwise
    if ! is_loopback "$HOST"; then
        net=(--allowed-hosts "$HOST:$MLFLOW_PORT,$HOST" --cors-allowed-origins "http://$HOST:$MLFLOW_PORT")
    fi
    (
        export PGPASSFILE=$SECRETS/pgpass
        export MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://mlflow@$HOST:$PG_PORT/mlflow
        export MLFLOW_AUTH_CONFIG_PATH=$MLDIR/basic_auth.ini
        MLFLOW_AUTH_ADMIN_PASSWORD=$(secret mlflow_admin) MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret flask_secret)
        export MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
        export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
        cd "$MLDIR"
        spawn mlflow "$LOGS/mlflow.log" mlflow server --app-name basic-auth --host "$HOST" --port "$MLFLOW_PORT" \
            --workers "$MLFLOW_WORKERS" --artifacts-destination "s3://$ARTIFACT_BUCKET/mlartifacts" ${net[@]+"${net[@]}"}
    )
    wait_for mlflow 180 http_ok "http://$HOST:$MLFLOW_PORT/health"
    mlflow_users || fail mlflow "creating the MLflow users failed"
    say "mlflow up on http://$HOST:$MLFLOW_PORT (pid $(pid_of mlflow))"
}

mlflow_users() {  # create the pipeline and reader users (idempotent), as the stack admin
    STACK_URL=http://$HOST:$MLFLOW_PORT STACK_SECRETS=$SECRETS \
    STACK_USERS="$ADMIN_USER $PIPELINE_USER $READER_USER" "$PY" - <<'EOF' >> "$LOGS/mlflow-users.log" 2>&1
import base64, json, os, urllib.error, urllib.request
url, d = os.environ["STACK_URL"], os.environ["STACK_SECRETS"]
admin, pipeline, reader = os.environ["STACK_USERS"].split()
pw = lambda n: open(os.path.join(d, n)).read().strip()
auth = "Basic " + base64.b64encode(f"{admin}:{pw('mlflow_admin')}".encode()).decode()
def call(method, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method=method,
                                 headers={"Authorization": auth, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
for user, secret in ((pipeline, "mlflow_pipeline"), (reader, "mlflow_reader")):
    st = call("POST", "/api/2.0/mlflow/users/create", {"username": user, "password": pw(secret)})
    print("create user", user, st)
    if st not in (200, 400):
        raise SystemExit(f"creating {user}: HTTP {st}")
EOF
}

write_env() {
    local tmp=$STACK_ENV_FILE.tmp.$$
    mkdir -p "$(dirname "$STACK_ENV_FILE")"
    {
        echo "# written by deploy/stack.sh up -- secrets: never commit, never print"
        q() { printf "export %s='%s'\n" "$1" "$2"; }
        q MLFLOW_TRACKING_URI "http://$HOST:$MLFLOW_PORT"
        q MLFLOW_TRACKING_USERNAME "$PIPELINE_USER"
        q MLFLOW_TRACKING_PASSWORD "$(secret mlflow_pipeline)"
        q STACK_READER_USERNAME "$READER_USER"
        q STACK_READER_PASSWORD "$(secret mlflow_reader)"
        q STACK_ADMIN_USERNAME "$ADMIN_USER"
        q STACK_ADMIN_PASSWORD "$(secret mlflow_admin)"
        q AWS_ACCESS_KEY_ID "$(cat "$SECRETS/s3_access_key")"
        q AWS_SECRET_ACCESS_KEY "$(cat "$SECRETS/s3_secret_key")"
        q AWS_ENDPOINT_URL "http://$HOST:$RGW_PORT"
        q MLFLOW_S3_ENDPOINT_URL "http://$HOST:$RGW_PORT"
        q AWS_DEFAULT_REGION us-east-1
        q AWS_REQUEST_CHECKSUM_CALCULATION when_required
        q AWS_RESPONSE_CHECKSUM_VALIDATION when_required
        q STACK_ARTIFACT_BUCKET "$ARTIFACT_BUCKET"
        q STACK_DVC_BUCKET "$DVC_BUCKET"
        q DVC_REMOTE_URL "s3://$DVC_BUCKET/dvc"
        q OPTUNA_STORAGE "postgresql+psycopg2://optuna:$(secret pg_optuna)@$HOST:$PG_PORT/optuna"
        q STACK_DIR "$STACK_DIR"
    } > "$tmp"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$STACK_ENV_FILE"
}

# ---------------------------------------------------------------- commands
all_up() { local c; for c in "${COMPONENTS[@]}"; do [[ -n $(pid_of "$c") ]] || return 1; done; }

do_up() {
    load_conf
    if all_up && [[ -f $STACK_ENV_FILE ]]; then say "already up (env file: $STACK_ENV_FILE)"; return 0; fi
    # all secrets exist before anything reads them
    local s
    for s in pg_mlflow pg_optuna mlflow_admin mlflow_pipeline mlflow_reader flask_secret; do secret "$s" > /dev/null; done
    local t0=$SECONDS
    start_postgres
    start_ceph
    start_mlflow
    write_env
    say "all up in $((SECONDS - t0)) s; env file: $STACK_ENV_FILE (mode 0600)"
}

stop_pid() {  # stop_pid COMPONENT SIGNAL: signal the recorded process group, bounded wait, then KILL
    local comp=$1 sig=$2 pid i
    pid=$(pid_of "$comp")
    if [[ -z $pid ]]; then rm -f "$RUN/$comp.pid"; return 0; fi
    kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
        [[ -e /proc/$pid ]] || break
        sleep 1
    done
    if [[ -e /proc/$pid ]]; then
        say "$comp (pid $pid) ignored SIG$sig for 30 s: KILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        sleep 1
    fi
    # members of its process group that outlived it (uvicorn workers, postgres backends)
    if pgrep -g "$pid" > /dev/null 2>&1; then
        kill -KILL -- "-$pid" 2>/dev/null || true
        sleep 1
    fi
    rm -f "$RUN/$comp.pid"
    say "$comp stopped (pid $pid)"
}

do_down() {
    load_conf
    stop_pid mlflow TERM
    stop_pid radosgw TERM
    stop_pid ceph-osd TERM
    stop_pid ceph-mon TERM
    stop_pid postgres INT      # PostgreSQL's "fast" shutdown; TERM would wait for clients
}

do_restart() {  # restart COMPONENT: the others keep running
    load_conf
    case ${1:-} in
        mlflow) stop_pid mlflow TERM; start_mlflow ;;
        postgres) stop_pid postgres INT; start_postgres ;;
        *) die "restart: name mlflow or postgres" ;;
    esac
}

do_status() {
    load_conf
    local c pid rc=0
    for c in "${COMPONENTS[@]}"; do
        pid=$(pid_of "$c")
        if [[ -n $pid ]]; then
            printf '%-9s up    port %-5s pid %s\n' "$c" "$(port_of "$c")" "$pid"
        else
            printf '%-9s down  port %-5s\n' "$c" "$(port_of "$c")"
            rc=1
        fi
    done
    return $rc
}

do_dvc_remote() {
    local dir=${1:-.}
    [[ -f $STACK_ENV_FILE ]] || die "dvc-remote: no env file $STACK_ENV_FILE (run up, or write one)"
    # shellcheck disable=SC1090
    . "$STACK_ENV_FILE"
    cd "$dir"
    [[ -d .dvc ]] || die "dvc-remote: $PWD is not a DVC repository"
    dvc remote add -d -f team "$DVC_REMOTE_URL"
    if [[ -n ${AWS_ENDPOINT_URL:-} ]]; then dvc remote modify team endpointurl "$AWS_ENDPOINT_URL"; fi
    # the keys go through dvc's own entry point in-process: not on any command line
    "$PY" -c '
import os, sys
from dvc.cli import main
for key, var in (("access_key_id", "AWS_ACCESS_KEY_ID"), ("secret_access_key", "AWS_SECRET_ACCESS_KEY")):
    if main(["remote", "modify", "--local", "team", key, os.environ[var]]) != 0:
        sys.exit(1)'
    say "dvc remote 'team' -> $DVC_REMOTE_URL (keys in .dvc/config.local only)"
}

do_install() {
    local t0=$SECONDS pkgs=() p
    for p in radosgw ceph-mon ceph-osd postgresql; do
        dpkg -s "$p" > /dev/null 2>&1 || pkgs+=("$p")
    done
    if ((${#pkgs[@]})); then
        [[ $EUID -eq 0 ]] || die "install: apt packages missing (${pkgs[*]}); run as root"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
    fi
    say "apt part: $((SECONDS - t0)) s"
    [[ -n ${VIRTUAL_ENV:-} ]] || die "install: activate the project's virtual environment first"
    local pip=("$VIRTUAL_ENV/bin/python" -m pip install -q)
    # dvc[s3] first: boto3 unpinned next to it makes pip backtrack for minutes
    "${pip[@]}" "dvc[s3]>=3.50,<4"
    local botocore
    botocore=$("$VIRTUAL_ENV/bin/python" -c 'import importlib.metadata as m; print(m.version("botocore"))')
    local mm=${botocore%.*}
    "${pip[@]}" "boto3>=$mm.0,<=$botocore" "mlflow[auth]>=2.16,<3.18" "psycopg2-binary>=2.9,<3"
    say "install done in $((SECONDS - t0)) s"
}

case ${1:-} in
    up) do_up ;;
    down) do_down ;;
    status) do_status ;;
    dvc-remote) shift; do_dvc_remote "$@" ;;
    restart) shift; do_restart "$@" ;;
    install) do_install ;;
    destroy) do_down; rm -rf "$STACK_DIR"; rm -f "$STACK_ENV_FILE"; say "state removed" ;;
    *) sed -n '2,37p' "$0"; exit 2 ;;
esac
