// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemd` under a service manager: sockets passed by
//! `systemd-socket-activate` (Debian's systemd package) that simulated VMs
//! then use over real vhost-user, sockets kept across a restart, clear
//! errors for sockets that do not fit the configuration, and the
//! `READY=1`/`STATUS=`/`STOPPING=1` notifications a `Type=notify` unit
//! waits for.

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};

use common::guest::*;
use common::*;
use vtmem_api::{Client, Request, VmDetails};
use vtmem_guestsim::{PoolSpec, Status, Vm, VmOptions};

/// `systemd-socket-activate`, if installed (Debian: package systemd;
/// `scripts/apt-setup.sh install systemd` installs it).
fn socket_activate() -> Option<PathBuf> {
    let found = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if found.is_none() {
        eprintln!("skipped: systemd-socket-activate is not installed (Debian package systemd)");
    }
    found
}

/// `systemd-socket-activate`, a scratch directory and its `run/`, where
/// the sockets are made; `None` (skipped) without the program.
fn activation() -> Option<(PathBuf, tempfile::TempDir, PathBuf)> {
    let activate = socket_activate()?;
    let dir = temp_dir();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    Some((activate, dir, run))
}

/// Waits until systemd-socket-activate listens on every path: it says so
/// after listen() (the file exists already after bind(), when a connection
/// would still be refused).
fn wait_listening(p: &Spawned, paths: &[&Path]) {
    wait_until("systemd-socket-activate to listen", DEADLINE, || {
        let log = p.log();
        paths
            .iter()
            .all(|path| log.contains(&format!("Listening on {} as ", path.display())))
    });
}

/// A process whose output is collected line by line.
struct Spawned {
    child: Child,
    stdin: Option<ChildStdin>,
    log: Arc<Mutex<String>>,
    ready: Receiver<String>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Spawned {
    fn start(cmd: &mut Command) -> Spawned {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, ready) = mpsc::channel();
        let mut readers = Vec::new();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for (stream, tx) in [
            (Box::new(out) as Box<dyn std::io::Read + Send>, Some(tx)),
            (Box::new(err), None),
        ] {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if let Some(tx) = &tx {
                        if line.starts_with(READY_PREFIX) {
                            let _ = tx.send(line.clone());
                        }
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            }));
        }
        let stdin = child.stdin.take();
        Spawned {
            child,
            stdin,
            log,
            ready,
            readers,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The next readiness line of a vtmemd in this process.
    fn wait_ready(&self) -> String {
        self.ready
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|e| panic!("no readiness line ({e}); output:\n{}", self.log()))
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until("the process to exit", DEADLINE, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        // Everything it printed is in the log once its output ends.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status.unwrap()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The VM list from the control socket at `ctl`.
fn list(ctl: &Path) -> Vec<VmDetails> {
    let mut c = Client::connect(ctl, DEADLINE).expect("control socket");
    c.call_as(&Request::List {}).expect("list")
}

/// Stores and reads back a few pages through `vm`.
fn exercise(vm: &Vm, seed: u64) {
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(seed, 32);
    let st = vm.put_batch(&items(pool, 1, &data)).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok), "{st:?}");
    let hs: Vec<_> = (0..data.len() as u64).map(|i| handle(pool, 1, i)).collect();
    for (i, (s, p)) in vm.get_batch(&hs).unwrap().iter().enumerate() {
        assert_eq!(*s, Status::Ok, "page {i}");
        assert_eq!(checksum(p), checksum(&data[i]), "page {i}");
    }
}

/// Connects a simulated VM, with a deadline (the handshake waits for a
/// vtmemd to take the connection).
fn connect_vm(path: &Path) -> Vm {
    let path = path.to_path_buf();
    with_timeout(DEADLINE, "vhost-user handshake", move || {
        Vm::connect(&path, &VmOptions::default())
    })
    .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// Whether descriptor `fd` of process `pid` is close-on-exec.
fn cloexec(pid: u32, fd: u32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .expect("a flags line");
    u32::from_str_radix(flags.trim(), 8).unwrap() & 0o2000000 != 0
}

#[test]
fn systemd_socket_activate_passes_the_control_and_vm_sockets() {
    let Some((activate, _dir, run)) = activation() else {
        return;
    };
    let (ctl, vm1_sock, vm2_sock) = (
        run.join("vtmemd.ctl"),
        run.join("vm1.sock"),
        run.join("vm2.sock"),
    );
    let mut p = Spawned::start(
        Command::new(activate)
            .arg("-l")
            .arg(&ctl)
            .arg("-l")
            .arg(&vm1_sock)
            .arg("--fdname=control:vm1")
            .args(["-E", "RUST_LOG=info", VTMEMD, "--socket-dir"])
            .arg(&run)
            .args(["--vm", "vm1", "--vm", "vm2", "--host-limit", "64M"]),
    );
    wait_listening(&p, &[&ctl, &vm1_sock]);
    // vtmemd starts on the first connection: nothing of its own yet.
    assert!(!vm2_sock.exists());
    assert!(p.ready.try_recv().is_err());

    // That first connection is a VMM's: vtmemd takes it from the inherited
    // socket and serves it.
    let vm1 = connect_vm(&vm1_sock);
    let ready = p.wait_ready();
    assert!(ready.contains("2 VM(s)"), "{ready}");
    assert!(ready.contains("2 inherited socket(s)"), "{ready}");
    assert!(
        ready.contains(&format!("control socket {}", ctl.display())),
        "{ready}"
    );
    exercise(&vm1, 1);

    // The VM vtmemd was not given a socket for has one of its own.
    let vm2 = connect_vm(&vm2_sock);
    exercise(&vm2, 2);
    let vms = list(&ctl);
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0].info.socket, vm1_sock);
    assert_eq!(vms[1].info.socket, vm2_sock);
    assert!(vms
        .iter()
        .all(|vm| vm.info.connected && vm.stats.persistent_pages == 32));
    let out = vtmemctl_env(&["--socket", ctl.to_str().unwrap(), "list"], None);
    out.ok();

    // vtmemd is systemd-socket-activate's process, exec'd; the inherited
    // descriptors are close-on-exec now.
    wait_until("the inherited-socket log line", DEADLINE, || {
        p.log().contains("inherited socket 'control'")
    });
    assert!(cloexec(p.pid(), 3) && cloexec(p.pid(), 4));

    drop((vm1, vm2));
    p.signal(Signal::TERM);
    assert_eq!(p.wait_exit().code(), Some(0), "{}", p.log());
    // The service manager's socket files stay, vtmemd's own is gone.
    assert!(ctl.exists() && vm1_sock.exists());
    assert!(!vm2_sock.exists());
}

#[test]
fn sockets_outlive_a_restart_and_hold_connections_until_it() {
    let Some((activate, _dir, run)) = activation() else {
        return;
    };
    let (ctl, vm1_sock) = (run.join("vtmemd.ctl"), run.join("vm1.sock"));
    // A manager that keeps the sockets while vtmemd restarts: the shell
    // holds them, starts vtmemd, and once it exited waits for a line on
    // its input before starting it again, with LISTEN_PID set to each
    // vtmemd's own pid, as systemd does.
    let script = r#"
        run() { sh -c 'export LISTEN_PID=$$; exec "$0" "$@"' "$@"; }
        run "$0" "$@"; echo "first vtmemd exited: $?"
        read go
        run "$0" "$@"; echo "second vtmemd exited: $?"
    "#;
    let mut p = Spawned::start(
        Command::new(activate)
            .arg("-l")
            .arg(&ctl)
            .arg("-l")
            .arg(&vm1_sock)
            .arg("--fdname=control:vm1")
            .args(["-E", "RUST_LOG=info", "/bin/sh", "-c", script, VTMEMD])
            .args([OsStr::new("--socket-dir"), run.as_os_str()])
            .args(["--vm", "vm1", "--host-limit", "64M"]),
    );
    wait_listening(&p, &[&ctl, &vm1_sock]);
    let vm = connect_vm(&vm1_sock);
    p.wait_ready();
    exercise(&vm, 3);
    drop(vm);
    let first = list(&ctl);
    assert_eq!(first[0].info.connections, 1);

    // Stop the first vtmemd (the shell ignores SIGTERM while it waits:
    // signal vtmemd, the shell's child).
    let pids =
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", p.pid(), p.pid())).unwrap();
    let vtmemd: i32 = pids.split_whitespace().next().unwrap().parse().unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(vtmemd).unwrap(),
        Signal::TERM,
    )
    .unwrap();
    wait_until("the first vtmemd to exit", DEADLINE, || {
        p.log().contains("first vtmemd exited: 0")
    });
    assert!(ctl.exists() && vm1_sock.exists(), "socket files kept");

    // No vtmemd runs: a VMM and an administrator connect all the same, and
    // wait in the sockets' queues.
    let waiting_vm = {
        let path = vm1_sock.clone();
        std::thread::spawn(move || Vm::connect(&path, &VmOptions::default()))
    };
    let waiting_ctl = {
        let ctl = ctl.clone();
        std::thread::spawn(move || list(&ctl))
    };
    let stdin = p.stdin.as_mut().unwrap();
    writeln!(stdin, "go").unwrap();
    stdin.flush().unwrap();
    p.wait_ready();
    let vm = with_timeout(DEADLINE, "queued VMM", move || waiting_vm.join().unwrap())
        .expect("the VMM queued during the restart is served");
    exercise(&vm, 4);
    let vms = with_timeout(DEADLINE, "queued list", move || waiting_ctl.join().unwrap());
    assert_eq!(vms.len(), 1);
    // Exactly the one connection made: vtmemd left nothing of its own in
    // the inherited socket's queue when it stopped.
    let now = list(&ctl);
    assert_eq!(now[0].info.connections, 1, "{}", p.log());
    assert!(now[0].info.connected);
    drop(vm);
}

/// Runs vtmemd as if a service manager had passed `fds` descriptors named
/// `names` (which the shell sets up with `redirect`), and returns its exit
/// status and output.
fn activated(
    fds: &str,
    names: Option<&str>,
    redirect: &str,
    args: &[&str],
) -> (Option<i32>, String) {
    let dir = temp_dir();
    let names = names.map_or(String::new(), |n| format!("export LISTEN_FDNAMES={n}; "));
    let script =
        format!("export LISTEN_PID=$$ LISTEN_FDS={fds}; {names}exec \"$0\" \"$@\" {redirect}");
    let out = run(
        Command::new("/bin/sh")
            .args(["-c", &script, VTMEMD, "--socket-dir"])
            .arg(dir.path())
            .args(args),
        DEADLINE,
    );
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code(), text)
}

#[test]
fn wrong_inherited_sockets_stop_the_start_with_a_clear_error() {
    let cases = [
        (
            "1",
            Some("control"),
            "",
            "descriptor 3: Bad file descriptor",
        ),
        (
            "1",
            Some("control"),
            "3</dev/null",
            "inherited socket 'control' (descriptor 3): not a socket",
        ),
        (
            "2",
            Some("control"),
            "",
            "LISTEN_FDS=2 but LISTEN_FDNAMES='control' names 1 socket(s)",
        ),
        ("1", None, "", "LISTEN_FDS=1 but LISTEN_FDNAMES is not set"),
        (
            "lots",
            Some("control"),
            "",
            "LISTEN_FDS='lots' is not a number",
        ),
    ];
    for (fds, names, redirect, want) in cases {
        let (code, text) = activated(fds, names, redirect, &["--vm", "vm1"]);
        assert_eq!(code, Some(1), "{fds} {names:?} {redirect}: {text}");
        assert!(
            text.contains(want),
            "{fds} {names:?} {redirect}: want '{want}' in:\n{text}"
        );
        assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
    }
}

#[test]
fn a_socket_for_an_undeclared_vm_is_refused_by_name() {
    let Some((activate, dir, run)) = activation() else {
        return;
    };
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let (ctl, vm9) = (run.join("vtmemd.ctl"), run.join("vm9.sock"));
    let mut p = Spawned::start(
        Command::new(activate)
            .arg("-l")
            .arg(&ctl)
            .arg("-l")
            .arg(&vm9)
            .arg("--fdname=control:vm9")
            .arg("-E")
            .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
            .args([VTMEMD, "--socket-dir"])
            .arg(&run)
            .args(["--vm", "vm1"]),
    );
    wait_listening(&p, &[&ctl, &vm9]);
    let _start = UnixStream::connect(&ctl).unwrap();
    assert_eq!(p.wait_exit().code(), Some(1));
    let want = "inherited socket 'vm9' is for VM 'vm9', which is not configured \
                (declare it with --vm name=vm9 or a [[vm]] table in the configuration file)";
    assert!(p.log().contains(want), "{}", p.log());
    // The service manager hears why, too.
    let mut buf = [0u8; 1024];
    let n = notify.recv(&mut buf).expect("a STATUS= line");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        text.starts_with("STATUS=failed: socket activation: "),
        "{text}"
    );
    assert!(text.contains(want), "{text}");
}

#[test]
fn another_process_listen_pid_is_ignored() {
    // A LISTEN_PID that is not vtmemd's (a shell that forked instead of
    // exec'ing): the variables are for someone else; vtmemd binds its own.
    let dir = temp_dir();
    let mut p = Spawned::start(
        Command::new(VTMEMD)
            .env("LISTEN_PID", "1")
            .env("LISTEN_FDS", "3")
            .env("LISTEN_FDNAMES", "a:b:c")
            .arg("--socket-dir")
            .arg(dir.path())
            .args(["--vm", "vm1"]),
    );
    let ready = p.wait_ready();
    assert!(!ready.contains("inherited"), "{ready}");
    // (The warning goes to stderr, read apart from the readiness line.)
    wait_until("the LISTEN_PID warning", DEADLINE, || {
        p.log().contains("LISTEN_PID=1 is not this process")
    });
    let vm = connect_vm(&dir.path().join("vm1.sock"));
    exercise(&vm, 5);
    drop(vm);
    p.signal(Signal::TERM);
    assert_eq!(p.wait_exit().code(), Some(0));
}

/// The next notification datagram.
fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification before the deadline");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
fn type_notify_hears_ready_status_and_stopping() {
    let dir = temp_dir();
    let sock_dir = dir.path().join("run");
    // An abstract socket, as some managers use, and a path, as systemd does.
    for abstract_name in [false, true] {
        let name = format!("vtmem-test-notify-{}-{abstract_name}", std::process::id());
        let (notify, target) = if abstract_name {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
            (UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}"))
        } else {
            let path = dir.path().join(&name);
            (
                UnixDatagram::bind(&path).unwrap(),
                path.display().to_string(),
            )
        };
        notify.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut p = Spawned::start(
            Command::new(VTMEMD)
                .env("NOTIFY_SOCKET", &target)
                .arg("--socket-dir")
                .arg(&sock_dir)
                .args(["--vm", "vm1", "--host-limit", "64M"]),
        );
        let ready = next(&notify);
        assert_eq!(
            ready,
            "READY=1\nSTATUS=serving 1 VM(s), 0 connected; host memory 0 B of 64.0 MiB\n"
        );
        // READY=1 means every socket accepts now.
        UnixStream::connect(sock_dir.join("vtmemd.ctl")).expect("control socket accepts");
        let vm = Vm::connect(sock_dir.join("vm1.sock"), &VmOptions::default()).unwrap();
        exercise(&vm, 6);

        // Under the sandbox, a VM added at run time updates the status.
        let ctl = sock_dir.join("vtmemd.ctl");
        let out = vtmemctl_env(&["--socket", ctl.to_str().unwrap(), "add-vm", "vm2"], None);
        out.ok();
        let status = next(&notify);
        assert!(
            status.starts_with("STATUS=serving 2 VM(s), 1 connected; host memory "),
            "{status}"
        );
        drop(vm);

        p.signal(Signal::TERM);
        assert_eq!(next(&notify), "STOPPING=1\nSTATUS=stopping (SIGTERM)\n");
        assert_eq!(p.wait_exit().code(), Some(0), "{}", p.log());
    }
}
