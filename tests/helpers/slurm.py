"""A real single-node SLURM cluster on 127.0.0.1 for the tests marked `slurm`: munge, MariaDB,
slurmdbd (accounting: without it `sacct` fails, submitit reads every job as UNKNOWN and waits
forever on one that was cancelled), slurmctld and slurmd, with a config generated into a fresh
folder under /tmp, ports chosen free, state and spool inside that folder.

No cgroups: proctrack/linuxproc, task/none, jobacct_gather/none. The daemons run as root (SLURM's
SlurmUser), munged as the `munge` user. A requeued job may start again after `cred_expire`
(AuthInfo), 5 s here instead of 120.

Under pytest-xdist the cluster is shared: the first worker that needs it starts it under a file
lock and records it in `<folder>/cluster.json`; each worker counts itself in, and the last one out
stops every daemon by the PID recorded when it was started (nothing else is touched). The folder
is named after xdist's test-run id, so the workers of one `pytest` find it and other runs do not.

Debian bookworm: apt-get install --no-install-recommends slurmctld slurmd slurm-client munge
slurmdbd mariadb-server (.ci/run does)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

from tests.helpers.mlflow_server import free_port

PROGRAMS = ["munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd",
            "sbatch", "sacct", "sinfo", "squeue", "scontrol", "scancel", "srun"]
PACKAGES = "slurmctld slurmd slurm-client munge slurmdbd mariadb-server"


def missing() -> str | None:
    """Why no cluster can start here, in one line; None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to run a SLURM cluster (slurmd, munged, MariaDB)"
    absent = [p for p in PROGRAMS if _which(p) is None]
    if absent:
        return f"needs {', '.join(absent)}: apt-get install --no-install-recommends {PACKAGES}"
    return None


def _which(program: str) -> str:
    return shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


@dataclass
class Cluster:
    root: str
    conf: str  # slurm.conf: SLURM_CONF for every client and job
    partition: str = "debug"
    pids: dict[str, int] = field(default_factory=dict)  # daemon -> pid, as started here

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": self.conf}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """A SLURM client command against this cluster; its stdout."""
        proc = subprocess.run([_which(args[0]), *args[1:]], env=os.environ | self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def log(self, daemon: str) -> str:
        path = Path(self.root, "log", f"{daemon}.log")
        return path.read_text(errors="replace") if path.exists() else ""


def _config(root: Path, ports: dict[str, int], cpus: int) -> dict[str, str]:
    host = socket.gethostname().split(".")[0]
    munge_socket = root / "munge" / "munge.socket"
    auth = f"AuthType=auth/munge\nAuthInfo=socket={munge_socket},cred_expire=5\n"
    slurm_conf = f"""\
ClusterName=harness
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports['slurmctld']}
SlurmdPort={ports['slurmd']}
SlurmUser=root
SlurmdUser=root
{auth}CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=debug2
SlurmdDebug=info
LogTimeFormat=iso8601_ms
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports['slurmdbd']}
AccountingStoragePass={munge_socket}
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=30
MinJobAge=600
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    slurmdbd_conf = f"""\
{auth}DbdAddr=127.0.0.1
DbdHost={host}
DbdPort={ports['slurmdbd']}
SlurmUser=root
PidFile={root}/run/slurmdbd.pid
LogFile={root}/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mariadb']}
StorageUser=root
StorageLoc=slurm_acct_db
"""
    return {"slurm.conf": slurm_conf, "slurmdbd.conf": slurmdbd_conf}


def _wait(what: str, probe, procs: dict[str, subprocess.Popen], root: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return
        for name, proc in procs.items():
            if proc.poll() is not None:
                tail = "".join(p.read_text(errors="replace")[-1500:] for p in
                               (Path(root, "log", f"{name}.log"), Path(root, "log", f"{name}.out")) if p.exists())
                raise RuntimeError(f"{name} exited {proc.returncode} before {what}:\n{tail}")
        time.sleep(0.2)
    raise RuntimeError(f"no {what} after {timeout_s} s")


def _start(root: Path, cpus: int) -> Cluster:
    for sub in ("etc", "state", "spool", "run", "log", "mysql", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # munged (the munge user) must reach its folder
    ports = {name: free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mariadb")}
    for name, text in _config(root, ports, cpus).items():
        path = root / "etc" / name
        path.write_text(text)
        path.chmod(0o600)  # slurmdbd refuses a config others may read
    conf = str(root / "etc" / "slurm.conf")
    env = os.environ | {"SLURM_CONF": conf}
    cluster = Cluster(str(root), conf)
    procs: dict[str, subprocess.Popen] = {}

    def daemon(name: str, argv: list[str], **kw) -> subprocess.Popen:
        log = open(root / "log" / f"{name}.out", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, **kw)
        procs[name] = proc
        cluster.pids[name] = proc.pid
        return proc

    try:
        # munge: a key of its own, a socket of its own
        import pwd
        munge = pwd.getpwnam("munge")
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (root / "munge", key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        (root / "munge").chmod(0o700)
        daemon("munged", [_which("munged"), "--foreground", "--force", f"--socket={root}/munge/munge.socket",
                          f"--key-file={key}", f"--pid-file={root}/munge/munged.pid",
                          f"--log-file={root}/munge/munged.log", f"--seed-file={root}/munge/munged.seed"],
               user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        # MariaDB on 127.0.0.1, root without a password (only the tests' slurmdbd talks to it)
        subprocess.run([_which("mariadb-install-db"), "--no-defaults", f"--datadir={root}/mysql", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True, timeout=120)
        daemon("mariadbd", [_which("mariadbd"), "--no-defaults", f"--datadir={root}/mysql", "--user=root",
                           "--bind-address=127.0.0.1", f"--port={ports['mariadb']}", f"--socket={root}/run/mysql.sock",
                           f"--pid-file={root}/run/mariadb.pid", f"--log-error={root}/log/mariadb.log",
                           "--skip-log-bin", "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=8M"])
        _wait("MariaDB listening", lambda: _listening(ports["mariadb"]), procs, root)
        daemon("slurmdbd", [_which("slurmdbd"), "-D"])
        _wait("slurmdbd listening", lambda: _listening(ports["slurmdbd"]), procs, root)
        daemon("slurmctld", [_which("slurmctld"), "-D", "-i"])
        _wait("slurmctld answering", lambda: _answers(env), procs, root)
        daemon("slurmd", [_which("slurmd"), "-D", "-N", socket.gethostname().split(".")[0]])
        _wait("the node idle in sinfo", lambda: _node_idle(env), procs, root)
    except BaseException:
        _stop(cluster)
        raise
    return cluster


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _answers(env) -> bool:
    return subprocess.run([_which("scontrol"), "ping"], env=env, capture_output=True, text=True,
                          timeout=10).stdout.count("UP") > 0


def _node_idle(env) -> bool:
    out = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True,
                         timeout=10).stdout.split()
    return out == ["idle"]


def _is_ours(pid: int, name: str) -> bool:
    """Whether `pid` is still the daemon `name` we started (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return Path(cmdline).name == name


def _stop(cluster: Cluster, timeout_s: float = 20) -> None:
    """Cancel the jobs still there (their processes belong to slurmstepd, which outlives
    slurmd), then stop the daemons it started, by pid, the last started first."""
    if _is_ours(cluster.pids.get("slurmctld", 0), "slurmctld"):
        try:
            cluster.run("scancel", "--user=root", check=False)
            deadline = time.monotonic() + 45  # KillWait (30 s) and a little
            while cluster.run("squeue", "-h", check=False).strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass
    for name, pid in reversed(list(cluster.pids.items())):
        if _is_ours(pid, name):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _is_ours(pid, name) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.1)
            if _is_ours(pid, name):
                os.kill(pid, signal.SIGKILL)
        _reap(pid)
    cluster.pids.clear()


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child (started by another worker) or reaped already


def _shared_root() -> Path:
    """HARNESS_SLURM_DIR, where set: a cluster kept up by `python -m tests.helpers.slurm` there is
    reused (and left up) by the tests."""
    if os.environ.get("HARNESS_SLURM_DIR"):
        return Path(os.environ["HARNESS_SLURM_DIR"])
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return Path(tempfile.gettempdir(), f"harness-slurm-{run}")


@contextmanager
def shared_cluster(cpus: int = 8):
    """The cluster of this test run, started by whichever worker comes first; stopped by the last
    one to leave. `cpus`: CPUs the node announces (jobs need not wait for each other's cores)."""
    root = _shared_root()
    lock = FileLock(str(root) + ".lock")
    record = root / "cluster.json"
    with lock:
        if record.exists():
            state = json.loads(record.read_text())
            cluster = Cluster(**state["cluster"])
        else:
            if root.exists():  # never removed: it is not ours
                raise RuntimeError(f"{root} exists and holds no cluster (cluster.json); choose a new folder")
            try:
                cluster = _start(root, cpus)
            except BaseException:
                shutil.rmtree(root, ignore_errors=True)
                raise
            state = {"cluster": asdict(cluster), "users": 0}
        state["users"] += 1
        record.write_text(json.dumps(state))
    try:
        yield cluster
    finally:
        with lock:
            state = json.loads(record.read_text())
            state["users"] -= 1
            if state["users"] == 0:
                _stop(Cluster(**state["cluster"]))
                shutil.rmtree(root, ignore_errors=True)
            else:
                record.write_text(json.dumps(state))
        if state["users"] == 0:
            Path(str(root) + ".lock").unlink(missing_ok=True)


if __name__ == "__main__":  # bring one up by hand: python -m tests.helpers.slurm
    import sys
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stops it as Ctrl-C does
    started = time.monotonic()
    with shared_cluster() as c:
        print(f"up in {time.monotonic() - started:.1f} s: export SLURM_CONF={c.conf}; Ctrl-C stops it", flush=True)
        print(c.run("sinfo"), flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


# ---- for the tests ----------------------------------------------------------------------------

import pytest  # noqa: E402  (the helpers above run without pytest: python -m tests.helpers.slurm)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The SLURM cluster of this test run; SLURM_CONF points every client (and sbatch's jobs) at
    it. Skips, in one line, where root or the packages are missing."""
    why = missing()
    if why:
        pytest.skip(why)
    with shared_cluster() as cluster:
        before = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = cluster.conf
        try:
            yield cluster
        finally:
            if before is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = before


def slurm_job_id(log: Path) -> str:
    """The SLURM job id (`<array id>_<task>`) of a job, from its submitit log's folder."""
    return log.parent.name


def _status_fields(pid: int) -> dict[str, str]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:  # it has ended
        return {}
    return dict(line.split(":", 1) for line in status.splitlines() if ":" in line)


def signal_pending(pid: int, signum: int) -> bool:
    """Whether signal `signum` waits to be delivered to process `pid` (a stopped process keeps it
    pending until continued): its bit in /proc/<pid>/status's SigPnd (the thread's) or ShdPnd (the process's)."""
    fields = _status_fields(pid)
    return any(int(fields[k], 16) >> (signum - 1) & 1 for k in ("SigPnd", "ShdPnd") if k in fields)


def stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (SIGSTOP)."""
    return _status_fields(pid).get("State", "").strip().startswith("T")


def task_pids(cluster: Cluster, job_id: str) -> list[int]:
    """The pids of the tasks of a job's first step (the processes srun started: submitit's workers)."""
    import re
    raw = re.search(r"JobId=(\d+)", cluster.run("scontrol", "show", "job", job_id)).group(1)  # 6_0 -> 7
    pids = []
    for line in cluster.run("scontrol", "listpids", raw).splitlines()[1:]:
        pid, _, step, *_ = line.split()
        if step == "0" and Path(f"/proc/{pid}").exists():  # not a short-lived child that has ended since
            pids.append(int(pid))
    return pids
