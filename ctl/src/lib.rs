// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemctl`, the host administrator's tool: a client of `vtmemd`'s
//! control socket (`docs/control-api.md`), documented in `docs/vtmemctl.md`.
//!
//! - [`args`]: the command line (clap), every value one of the control
//!   API's validated types ([`vtmem_api`]).
//! - [`model`]: rates from two samples of the store's counters.
//! - [`render`], [`format`]: tables and units for humans.
//!
//! It talks to the daemon only through [`vtmem_api::Client`] and typed
//! [`Request`]s; this crate does not depend on the daemon's. [`run`]
//! executes a parsed command; the `vtmemctl` binary only parses, calls it
//! and turns its error into one line and an exit status.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;
use vtmem_api::{Client, ClientError, Request, StatusReport, VmDetails, VmInfo};

pub mod args;
pub mod format;
pub mod model;
pub mod render;

pub use args::{Cli, Command};

use model::{activity, Sample};
use render::EvictionRate;

/// Exit status when the daemon reported an error (or answered nonsense).
pub const EXIT_DAEMON: i32 = 1;
/// Exit status of a usage error.
pub const EXIT_USAGE: i32 = 2;
/// Exit status when the daemon cannot be reached.
pub const EXIT_UNREACHABLE: i32 = 3;

/// Why a `vtmemctl` command failed. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Bad command line.
    #[error("{0}")]
    Usage(String),
    /// The control socket does not answer connections.
    #[error("cannot connect to vtmemd at {}: {source} (is vtmemd running? see --socket and VTMEM_CONTROL_SOCKET)", path.display())]
    Unreachable {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The connection failed after it was made.
    #[error("control socket {}: {msg}", path.display())]
    Connection {
        /// The socket path.
        path: PathBuf,
        /// What happened.
        msg: String,
    },
    /// The daemon refused the command; its own message.
    #[error("{0}")]
    Daemon(String),
    /// Standard output could not be written.
    #[error("writing the output: {0}")]
    Output(#[source] io::Error),
    /// A local resource (signal handling) failed.
    #[error("{0}")]
    System(String),
}

impl From<ClientError> for CtlError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Unreachable { path, source } => CtlError::Unreachable { path, source },
            ClientError::Connection { path, msg } => CtlError::Connection { path, msg },
            ClientError::Refused(msg) => CtlError::Daemon(msg),
            e @ ClientError::UnexpectedResult { .. } => CtlError::Daemon(e.to_string()),
        }
    }
}

impl CtlError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CtlError::Usage(_) => EXIT_USAGE,
            CtlError::Unreachable { .. } | CtlError::Connection { .. } => EXIT_UNREACHABLE,
            CtlError::Daemon(_) | CtlError::Output(_) | CtlError::System(_) => EXIT_DAEMON,
        }
    }

    /// Whether this is a closed output pipe (`vtmemctl top | head`), which
    /// ends the program quietly.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CtlError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

fn emit(out: &mut dyn Write, text: &str) -> Result<(), CtlError> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CtlError::Output)
}

fn emit_json(out: &mut dyn Write, value: &Value) -> Result<(), CtlError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    emit(out, &format!("{text}\n"))
}

/// Runs one command against the control socket at `socket`, writing its
/// output to `out`.
pub fn run(cli: &Cli, socket: &Path, out: &mut dyn Write) -> Result<(), CtlError> {
    let timeout = Duration::from_secs_f64(cli.timeout);
    let mut c = Client::connect(socket, timeout)?;
    let json = cli.json;
    let mut change = |request: Request, done: String| -> Result<(), CtlError> {
        let result = c.call(&request)?;
        if json {
            emit_json(out, &result)
        } else {
            emit(out, &format!("{done}\n"))
        }
    };
    match &cli.command {
        Command::Status { interval } => status(&mut c, json, *interval, out),
        Command::List => list(&mut c, json, out),
        Command::Show { vm } => {
            let request = Request::Show { vm: vm.clone() };
            if json {
                return emit_json(out, &c.call(&request)?);
            }
            let d: VmDetails = c.call_as(&request)?;
            emit(out, &render::show(&d))
        }
        Command::SetQuota {
            vm,
            persistent,
            ephemeral,
        } => {
            let mut said = Vec::new();
            if let Some(p) = persistent {
                said.push(format!("persistent quota {}", format::quota(p.bytes())));
            }
            if let Some(e) = ephemeral {
                said.push(format!("ephemeral quota {}", format::quota(e.bytes())));
            }
            let done = format!("{vm}: {}", said.join(", "));
            change(
                Request::SetQuota {
                    vm: vm.clone(),
                    persistent: *persistent,
                    ephemeral: *ephemeral,
                },
                done,
            )
        }
        Command::SetWeight { vm, weight } => change(
            Request::SetWeight {
                vm: vm.clone(),
                weight: *weight,
            },
            format!("{vm}: weight {weight}"),
        ),
        Command::SetLimit { size } => change(
            Request::SetLimit { bytes: *size },
            format!("host limit {}", format::bytes(size.bytes())),
        ),
        Command::Freeze { vm } => change(
            Request::Freeze { vm: vm.clone() },
            format!("{vm}: frozen (puts refused until thawed)"),
        ),
        Command::Thaw { vm } => change(Request::Thaw { vm: vm.clone() }, format!("{vm}: thawed")),
        Command::Flush { vm, ephemeral } => change(
            Request::Flush {
                vm: vm.clone(),
                ephemeral_only: *ephemeral,
            },
            if *ephemeral {
                format!("{vm}: ephemeral pages flushed")
            } else {
                format!("{vm}: all pages flushed")
            },
        ),
        Command::AddVm(a) => {
            let request = Request::AddVm(a.spec());
            if json {
                return emit_json(out, &c.call(&request)?);
            }
            let vm: VmInfo = c.call_as(&request)?;
            emit(
                out,
                &format!("added {}: listening on {}\n", vm.name, vm.socket.display()),
            )
        }
        Command::RemoveVm { vm } => change(
            Request::RemoveVm { vm: vm.clone() },
            format!("removed {vm}"),
        ),
        Command::DedupGroup { vm, group, none } => {
            let group = match (group, none) {
                (Some(g), _) => g.0.clone(),
                (None, true) => None,
                (None, false) => {
                    let d: VmDetails = c.call_as(&Request::Show { vm: vm.clone() })?;
                    let g = d.info.config.dedup_group;
                    return if json {
                        emit_json(out, &serde_json::to_value(&g).unwrap_or(Value::Null))
                    } else {
                        emit(
                            out,
                            &format!("{}\n", g.as_ref().map_or("none", |g| g.as_str())),
                        )
                    };
                }
            };
            let done = match &group {
                Some(g) => format!("{vm}: dedup group {g}"),
                None => format!("{vm}: no dedup group"),
            };
            change(
                Request::SetDedupGroup {
                    vm: vm.clone(),
                    group,
                },
                done,
            )
        }
        Command::Auth { vm, uuid } => change(
            Request::Auth {
                vm: vm.clone(),
                uuid: *uuid,
            },
            format!("{vm}: authorized shared pool {uuid}"),
        ),
        Command::Deauth { vm, uuid } => change(
            Request::Deauth {
                vm: vm.clone(),
                uuid: *uuid,
            },
            format!("{vm}: deauthorized shared pool {uuid}"),
        ),
        Command::Top {
            interval,
            iterations,
            batch,
        } => top(
            &mut c,
            &TopOptions {
                interval: Duration::from_secs_f64(*interval),
                iterations: *iterations,
                json,
                batch: *batch,
            },
            out,
        ),
    }
}

fn sample(c: &mut Client) -> Result<Sample, CtlError> {
    let report: StatusReport = c.call_as(&Request::Status {})?;
    Ok(Sample {
        at: Instant::now(),
        stats: report.store,
        uptime: Some(report.uptime_seconds),
        state_dir: report.state_dir,
        recovered: report.recovered,
    })
}

fn status(c: &mut Client, json: bool, interval: f64, out: &mut dyn Write) -> Result<(), CtlError> {
    if json {
        return emit_json(out, &c.call(&Request::Status {})?);
    }
    let first = sample(c)?;
    if interval <= 0.0 {
        return emit(
            out,
            &render::status(&first.stats, None, first.uptime, first.state()),
        );
    }
    std::thread::sleep(Duration::from_secs_f64(interval));
    let second = sample(c)?;
    let a = activity(&first, &second, &[]);
    let rate = EvictionRate {
        per_sec: a.evictions_per_sec,
        over_secs: a.interval_secs,
    };
    emit(
        out,
        &render::status(&second.stats, Some(rate), second.uptime, second.state()),
    )
}

fn list(c: &mut Client, json: bool, out: &mut dyn Write) -> Result<(), CtlError> {
    if json {
        return emit_json(out, &c.call(&Request::List {})?);
    }
    // One request: each entry of `list` carries the VM's store statistics.
    let vms: Vec<VmDetails> = c.call_as(&Request::List {})?;
    emit(out, &render::list(&vms))
}

/// How `top` runs.
#[derive(Clone, Copy, Debug)]
pub struct TopOptions {
    /// Time between frames.
    pub interval: Duration,
    /// Frames to draw; `None`: until interrupted.
    pub iterations: Option<u64>,
    /// One JSON object a line per frame.
    pub json: bool,
    /// No screen clearing.
    pub batch: bool,
}

/// Clears the screen and moves the cursor home.
pub const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// SIGINT and SIGTERM, caught and passed on by a thread, so that `top`
/// notices them between frames and ends cleanly.
struct Interrupt {
    rx: mpsc::Receiver<i32>,
}

impl Interrupt {
    fn install() -> Result<Self, CtlError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .map_err(|e| CtlError::System(format!("cannot set up signal handling: {e}")))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("vtmemctl-signals".to_string())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    let _ = tx.send(sig);
                }
            })
            .map_err(|e| CtlError::System(format!("cannot start a thread: {e}")))?;
        Ok(Interrupt { rx })
    }

    /// Sleeps for `d`; true if a signal arrived meanwhile.
    fn sleep(&self, d: Duration) -> bool {
        match self.rx.recv_timeout(d) {
            Ok(_) => true,
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(d);
                false
            }
        }
    }
}

/// `top`: samples `status` (and `list`, for connections) every interval
/// and draws per-VM rates over the last interval.
pub fn top(c: &mut Client, opts: &TopOptions, out: &mut dyn Write) -> Result<(), CtlError> {
    let interrupt = Interrupt::install()?;
    let mut prev = sample(c)?;
    let mut frames = 0u64;
    loop {
        if interrupt.sleep(opts.interval) {
            break;
        }
        let vms: Vec<VmDetails> = c.call_as(&Request::List {})?;
        let cur = sample(c)?;
        let a = activity(&prev, &cur, &vms);
        if opts.json {
            let line = serde_json::to_string(&a).map_err(|e| CtlError::System(e.to_string()))?;
            emit(out, &format!("{line}\n"))?;
        } else {
            let frame = render::top(&a, opts.interval.as_secs_f64());
            let sep = match (opts.batch, frames) {
                (false, _) => CLEAR_SCREEN,
                (true, 0) => "",
                (true, _) => "\n",
            };
            emit(out, &format!("{sep}{frame}"))?;
        }
        frames += 1;
        if opts.iterations.is_some_and(|n| frames >= n) {
            break;
        }
        prev = cur;
    }
    Ok(())
}
