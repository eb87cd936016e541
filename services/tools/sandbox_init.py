"""Launcher of one sandboxed Python run. Executed as a script, never imported by the service.

The tool service starts it as root, in a new session (so the whole run is one process group),
with ``python3 -I -S sandbox_init.py <config JSON>``, the user's code on stdin and a status pipe
on the file descriptor named in the config. It is a fresh single-threaded process, so it can
do what ``preexec_fn`` cannot do safely in a multi-threaded gRPC server. Steps:

1. read the code from stdin;
2. ``unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)``: a private mount table, a network
   namespace with no interface up (not even loopback, so every connect fails), and a PID
   namespace whose first process is the user's program;
3. fork an *init*: PID 1 of the new PID namespace. When it dies the kernel kills every process
   left in the namespace, and it dies with this launcher (``PR_SET_PDEATHSIG``), so killing the
   process group cannot leave anything behind, not even a process that called ``setsid()``;
4. in the init (still root): every mount read-only (``mount_setattr(AT_RECURSIVE,
   MOUNT_ATTR_RDONLY)``, Linux >= 5.12), a size-limited tmpfs on ``/tmp`` and ``/dev/shm`` (the
   only writable places; the work directory ``/tmp/work`` is cwd and HOME), a ``/proc`` of the
   new PID namespace; then fork the user's process;
5. in the user's process (PID 2): resource limits (RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE,
   RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE=0); drop to the run's own unprivileged uid/gid with
   no supplementary groups and ``PR_SET_NO_NEW_PRIVS``; exec the interpreter on the code with a
   clean environment;
6. the init reaps every process until the user's process ends, then writes its fate to the
   status pipe as one JSON line, ``{"exit_code": n}`` or ``{"signal": n}``, and exits (which
   ends the namespace). A set-up failure writes ``{"error": "..."}`` instead.

RLIMIT_NPROC counts every process of a uid and root ignores it, which is why the run gets a uid
of its own (the service hands out one per concurrent run); see ``sandbox.py``.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
#: mount_setattr(2) has the same number on every architecture (the unified syscall table, 5.12+).
SYS_MOUNT_SETATTR = 442

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class SetupError(Exception):
    pass


def check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what} failed: {os.strerror(errno)} (errno {errno})")


def mount(source, target, fstype, flags, data=None):
    check(
        libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                   data.encode() if data else None),
        f"mount {fstype or source} on {target}",
    )


def report(fd, **status):
    os.write(fd, (json.dumps(status) + "\n").encode())


def prepare_filesystem(cfg):
    # Mount events must not leak back to the host's mount table.
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    attr = MountAttr(attr_set=MOUNT_ATTR_RDONLY)
    check(
        libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)),
        "making every mount read-only (mount_setattr)",
    )
    uid, gid = cfg["uid"], cfg["gid"]
    tmpfs = f"size={cfg['tmp_bytes']},nr_inodes=4096,mode=1777"
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, tmpfs)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    work = cfg["workdir"]
    os.mkdir(work, 0o700)
    os.chown(work, uid, gid)
    return work


def run_user_program(cfg, script):
    """The user's process (PID 2 of the namespace): limits, unprivileged identity, exec."""
    cpu = cfg["cpu_s"]
    # Soft limit: SIGXCPU; the hard limit one second later is SIGKILL, for code that catches SIGXCPU.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["processes"], cfg["processes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["open_files"], cfg["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
    if os.getuid() != cfg["uid"] or os.geteuid() != cfg["uid"] or os.getegid() != cfg["gid"]:
        raise SetupError("could not drop privileges")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.umask(0o077)
    python = cfg["python"]
    os.execve(python, [python, "-I", "-B", "-u", script], cfg["env"])


def init(cfg, code, status_fd):
    """PID 1 of the new namespace. It stays root, outside the run's uid (so it does not count
    against RLIMIT_NPROC), reaps orphans, and reports how the user's process ended. The user's
    program must not be PID 1 itself: the kernel does not deliver default-action signals to a
    namespace's init, so SIGXCPU would never stop it."""
    try:
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        work = prepare_filesystem(cfg)
        script = os.path.join(work, "main.py")
        with open(script, "wb") as f:
            f.write(code)
        os.chown(script, cfg["uid"], cfg["gid"])
        os.chdir(work)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        user = os.fork()
    except (SetupError, OSError) as exc:
        report(status_fd, error=f"sandbox set-up: {exc}")
        os._exit(127)
    if user == 0:
        try:
            run_user_program(cfg, script)
        except (SetupError, OSError) as exc:
            report(status_fd, error=f"sandbox set-up: {exc}")
        os._exit(127)
    while True:  # reap everything; stop when the user's process is gone
        pid, status = os.wait()
        if pid == user:
            break
    if os.WIFSIGNALED(status):
        report(status_fd, signal=os.WTERMSIG(status))
    else:
        report(status_fd, exit_code=os.waitstatus_to_exitcode(status))
    # Exiting kills whatever the program left running in the namespace.
    os._exit(0)


def main():
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)  # the user's program must not see the status pipe
    try:
        code = sys.stdin.buffer.read()
        check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET), "unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET)")
        pid = os.fork()
    except (SetupError, OSError) as exc:
        report(status_fd, error=f"sandbox set-up: {exc}")
        os._exit(127)
    if pid == 0:
        init(cfg, code, status_fd)
    # Nothing to forward: the service stops a run with SIGKILL to the whole process group.
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    main()
