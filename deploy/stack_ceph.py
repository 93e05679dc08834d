"""Ceph: one monitor, one memstore OSD and a RADOS Gateway (the S3 API) with cephx auth, and the
stack's S3 user and buckets. The S3 keys go from radosgw-admin's stdout straight into the secrets folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from stack_core import Stack, StackError, http_ok, pid_of, run_logged, say, spawn, wait_for, write_private

ARTIFACT_BUCKET = "mlflow-artifacts"
DVC_BUCKET = "dvc-remote"

CONF = """\
# written by deploy/stack.py
[global]
fsid = {fsid}
mon_host = [v2:127.0.0.1:{mon_port}]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = {ceph}/keyring.$name
run_dir = {ceph}/run
admin_socket = {ceph}/run/$name.asok
pid_file = {ceph}/run/$name.pid
log_file = {logs}/ceph-$name.log
log_to_stderr = false
err_to_stderr = true
mon_cluster_log_file = {logs}/ceph-cluster.log
mon_data = {ceph}/mon/$name
osd_data = {ceph}/osd/$name
osd_objectstore = memstore
# SIGTERM must unmount the store: memstore writes its data to osd_data only then
osd_fast_shutdown = false
memstore_device_bytes = {memstore_bytes}
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
rgw_frontends = beast endpoint={host}:{rgw_port}
rgw_data = {ceph}/rgw
# debug level 1 writes an access log line per request, with the access key id of presigned URLs
debug_rgw = 0/5
log_file = {logs}/ceph-client.rgw.a.log
"""


def conf_path(st: Stack) -> str:
    return str(st.ceph / "ceph.conf")


def ceph(st: Stack, *args: str) -> list[str]:
    return ["ceph", "-c", conf_path(st), "-n", "client.admin", "--connect-timeout", "20", *args]


def write_conf(st: Stack) -> None:
    """Rewritten at each start: a changed setting takes effect at the next start."""
    text = CONF.format(
        fsid=(st.ceph / "fsid").read_text().strip(),
        mon_port=st.ports["MON_PORT"],
        rgw_port=st.ports["RGW_PORT"],
        host=st.host,
        ceph=st.ceph,
        logs=st.logs,
        memstore_bytes=st.memstore_bytes,
    )
    (st.ceph / "ceph.conf").write_text(text)


def setup_log(st: Stack) -> Path:
    return st.logs / "ceph-setup.log"


def make_monitor(st: Stack) -> None:
    """A new cluster: its fsid, the mon and admin keyrings, the monmap, the monitor's store."""
    shutil.rmtree(st.ceph / "mon" / "mon.a", ignore_errors=True)
    for old in [*(st.ceph / "osd").iterdir(), *st.ceph.glob("keyring.*")]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    (st.ceph / "fsid").write_text(f"{uuid.uuid4()}\n")
    write_conf(st)
    c, mon_key, admin_key = st.ceph, str(st.ceph / "keyring.mon.a"), str(st.ceph / "keyring.client.admin")
    steps = [
        ["ceph-authtool", "--create-keyring", mon_key, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"],
        ["ceph-authtool", "--create-keyring", admin_key, "--gen-key", "-n", "client.admin"]
        + ["--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"],
        ["ceph-authtool", mon_key, "--import-keyring", admin_key],
        ["monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{st.ports['MON_PORT']}]"]
        + ["--fsid", (c / "fsid").read_text().strip(), str(c / "monmap")],
        ["ceph-mon", "-c", conf_path(st), "--mkfs", "-i", "a", "--monmap", str(c / "monmap"), "--keyring", mon_key],
    ]
    if not all(run_logged(step, setup_log(st)) for step in steps):
        raise StackError("ceph-mon", f"mkfs failed (see also {setup_log(st)})", st.log("ceph-mon"))
    (c / "mon" / "mon.a" / "done").touch()


def make_osd(st: Stack) -> None:
    osd = st.ceph / "osd" / "osd.0"
    osd_uuid = str(uuid.uuid4())
    shutil.rmtree(osd, ignore_errors=True)
    osd.mkdir(parents=True)
    steps = [
        ceph(st, "osd", "new", osd_uuid),
        ["ceph-osd", "-c", conf_path(st), "-i", "0", "--mkfs", "--mkkey", "--no-mon-config", "--osd-uuid", osd_uuid],
        ceph(st, "auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd", "mgr", "allow profile osd")
        + ["-i", str(st.ceph / "keyring.osd.0")],
    ]
    if not all(run_logged(step, setup_log(st)) for step in steps):
        raise StackError("ceph-osd", f"mkfs failed (see also {setup_log(st)})", st.log("ceph-osd"))
    (osd / "done").touch()


def osd_up(st: Stack) -> bool:
    done = subprocess.run(ceph(st, "osd", "stat", "-f", "json"), capture_output=True, text=True)
    return done.returncode == 0 and json.loads(done.stdout)["num_up_osds"] >= 1


def mon_answers(st: Stack) -> bool:
    return subprocess.run(ceph(st, "mon", "stat"), capture_output=True).returncode == 0


def start_ceph(st: Stack) -> None:
    for d in ("run", "mon", "osd", "rgw"):
        (st.ceph / d).mkdir(parents=True, exist_ok=True)
    if not (st.ceph / "mon" / "mon.a" / "done").is_file():
        make_monitor(st)
    write_conf(st)
    conf = conf_path(st)
    mon = ["ceph-mon", "-f", "-c", conf, "-i", "a"]
    start_daemon(st, "ceph-mon", mon, 60, lambda: mon_answers(st), f" on 127.0.0.1:{st.ports['MON_PORT']}")
    if not (st.ceph / "osd" / "osd.0" / "done").is_file():
        make_osd(st)
    start_daemon(st, "ceph-osd", ["ceph-osd", "-f", "-c", conf, "-i", "0"], 90, lambda: osd_up(st))
    start_rgw(st)
    s3_user(st)
    make_buckets(st)


def start_rgw(st: Stack) -> None:
    keyring = st.ceph / "keyring.client.rgw.a"
    if not (keyring.is_file() and keyring.stat().st_size):
        create = ceph(st, "auth", "get-or-create", "client.rgw.a", "mon", "allow rw", "osd", "allow rwx")
        if not run_logged([*create, "-o", str(keyring)], setup_log(st)):
            raise StackError("radosgw", "creating its key failed", setup_log(st))
    rgw = ["radosgw", "-f", "-c", conf_path(st), "-n", "client.rgw.a"]
    where = f"{st.host}:{st.ports['RGW_PORT']}"
    start_daemon(st, "radosgw", rgw, 120, lambda: http_ok(f"http://{where}/"), f" on {where}")


def start_daemon(st: Stack, component: str, cmd: list[str], seconds: int, answers, where: str = "") -> None:
    """Start a Ceph daemon unless it runs, and wait until it answers."""
    if pid_of(st, component):
        say(f"{component} already running")
        return
    spawn(st, component, st.logs / f"{component}.out", cmd)
    wait_for(st, component, seconds, answers)
    say(f"{component} up{where} (pid {pid_of(st, component)})")


def s3_user(st: Stack) -> None:
    """The S3 user `team`: radosgw-admin generates its keys; its stdout goes to the secrets folder only."""
    if (st.secrets / "s3_secret_key").is_file() and (st.secrets / "s3_secret_key").read_text().strip():
        return
    create = ["radosgw-admin", "-c", conf_path(st), "-n", "client.admin", "user", "create"]
    with open(setup_log(st), "ab") as log:
        done = subprocess.run([*create, "--uid=team", "--display-name=team"], stdout=subprocess.PIPE, stderr=log)
    if done.returncode != 0:
        raise StackError("radosgw", "creating the S3 user failed", setup_log(st))
    key = json.loads(done.stdout)["keys"][0]
    write_private(st.secrets / "s3_access_key", key["access_key"] + "\n")
    write_private(st.secrets / "s3_secret_key", key["secret_key"] + "\n")


def s3_env(st: Stack) -> dict[str, str]:
    """The S3 settings of the stack's user (the mlflow server's and the env file's)."""
    url = f"http://{st.host}:{st.ports['RGW_PORT']}"
    return {
        "AWS_ACCESS_KEY_ID": (st.secrets / "s3_access_key").read_text().strip(),
        "AWS_SECRET_ACCESS_KEY": (st.secrets / "s3_secret_key").read_text().strip(),
        "AWS_ENDPOINT_URL": url,
        "MLFLOW_S3_ENDPOINT_URL": url,
        "AWS_DEFAULT_REGION": "us-east-1",
        # RGW 16 rejects the checksums newer botocore sends by default
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }


def make_buckets(st: Stack) -> None:
    """The artifact and DVC buckets, if missing."""
    import boto3

    env = s3_env(st)
    for name in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):  # read by botocore
        os.environ[name] = env[name]
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    try:
        have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for bucket in (ARTIFACT_BUCKET, DVC_BUCKET):
            if bucket not in have:
                s3.create_bucket(Bucket=bucket)
                with open(setup_log(st), "a") as log:
                    print("created bucket", bucket, file=log)
    except Exception as e:  # botocore's errors: one line naming the component, not a traceback
        raise StackError("radosgw", f"creating the buckets failed: {type(e).__name__}", setup_log(st)) from e
