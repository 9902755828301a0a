// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemctl`, the host administrator's tool: a client of `vtmemd`'s
//! control socket (`docs/control-api.md`), documented in `docs/vtmemctl.md`.
//!
//! - [`args`]: the command line (clap), with sizes, UUIDs, names and
//!   weights checked by the parsers of [`crate::config`].
//! - [`client`]: one control connection, newline-delimited JSON.
//! - [`model`]: typed views of results, and rates from two samples.
//! - [`render`], [`format`]: tables and units for humans.
//!
//! [`run`] executes a parsed command; `src/bin/vtmemctl.rs` only parses,
//! calls it and turns its error into one line and an exit status.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

pub mod args;
pub mod client;
pub mod format;
pub mod model;
pub mod render;

pub use args::{Cli, Command, DEFAULT_SOCKET, SOCKET_ENV};
pub use client::ControlClient;

use model::{activity, Sample, VmDetails, VmSummary};
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

fn vm_args(vm: &str) -> Value {
    json!({ "vm": vm })
}

/// Runs one command against the control socket at `socket`, writing its
/// output to `out`.
pub fn run(cli: &Cli, socket: &Path, out: &mut dyn Write) -> Result<(), CtlError> {
    let timeout = Duration::from_secs_f64(cli.timeout);
    let mut c = ControlClient::connect(socket, timeout)?;
    let json = cli.json;
    let simple = |c: &mut ControlClient, out: &mut dyn Write, command: &str, args, done| {
        change(c, out, json, command, args, done)
    };
    match &cli.command {
        Command::Status { interval } => status(&mut c, json, *interval, out),
        Command::List => list(&mut c, json, out),
        Command::Show { vm } => {
            let result = c.call("show", vm_args(vm))?;
            if json {
                return emit_json(out, &result);
            }
            let d: VmDetails = client::decode("show", result)?;
            emit(out, &render::show(&d))
        }
        Command::SetQuota {
            vm,
            persistent,
            ephemeral,
        } => {
            let mut args = Map::new();
            args.insert("vm".into(), json!(vm));
            let mut said = Vec::new();
            if let Some(p) = persistent {
                args.insert("persistent".into(), json!(p));
                said.push(format!("persistent quota {}", format::quota(*p)));
            }
            if let Some(e) = ephemeral {
                args.insert("ephemeral".into(), json!(e));
                said.push(format!("ephemeral quota {}", format::quota(*e)));
            }
            let done = format!("{vm}: {}", said.join(", "));
            simple(&mut c, out, "set-quota", Value::Object(args), done)
        }
        Command::SetWeight { vm, weight } => simple(
            &mut c,
            out,
            "set-weight",
            json!({"vm": vm, "weight": weight}),
            format!("{vm}: weight {weight}"),
        ),
        Command::SetLimit { size } => simple(
            &mut c,
            out,
            "set-limit",
            json!({ "bytes": size }),
            format!("host limit {}", format::bytes(*size)),
        ),
        Command::Freeze { vm } => simple(
            &mut c,
            out,
            "freeze",
            vm_args(vm),
            format!("{vm}: frozen (puts refused until thawed)"),
        ),
        Command::Thaw { vm } => simple(&mut c, out, "thaw", vm_args(vm), format!("{vm}: thawed")),
        Command::Flush { vm, ephemeral } => simple(
            &mut c,
            out,
            "flush",
            json!({"vm": vm, "ephemeral_only": ephemeral}),
            if *ephemeral {
                format!("{vm}: ephemeral pages flushed")
            } else {
                format!("{vm}: all pages flushed")
            },
        ),
        Command::AddVm(a) => {
            let mut args = Map::new();
            args.insert("name".into(), json!(a.name));
            if let Some(q) = a.persistent_quota {
                args.insert("persistent_quota".into(), json!(q));
            }
            if let Some(q) = a.ephemeral_quota {
                args.insert("ephemeral_quota".into(), json!(q));
            }
            if let Some(w) = a.weight {
                args.insert("weight".into(), json!(w));
            }
            if let Some(g) = &a.dedup_group {
                args.insert("dedup_group".into(), json!(g));
            }
            if !a.auth.is_empty() {
                args.insert("authorized_uuids".into(), json!(a.auth));
            }
            let result = c.call("add-vm", Value::Object(args))?;
            if json {
                return emit_json(out, &result);
            }
            let vm: VmSummary = client::decode("add-vm", result)?;
            emit(
                out,
                &format!("added {}: listening on {}\n", vm.name, vm.socket.display()),
            )
        }
        Command::RemoveVm { vm } => simple(
            &mut c,
            out,
            "remove-vm",
            vm_args(vm),
            format!("removed {vm}"),
        ),
        Command::DedupGroup { vm, group, none } => {
            if group.is_none() && !none {
                let d: VmDetails = c.call_as("show", vm_args(vm))?;
                let g = d.info.config.dedup_group;
                return if json {
                    emit_json(out, &json!(g))
                } else {
                    emit(out, &format!("{}\n", g.as_deref().unwrap_or("none")))
                };
            }
            let done = match group {
                Some(g) => format!("{vm}: dedup group {g}"),
                None => format!("{vm}: no dedup group"),
            };
            simple(
                &mut c,
                out,
                "set-dedup-group",
                json!({"vm": vm, "group": group}),
                done,
            )
        }
        Command::Auth { vm, uuid } => simple(
            &mut c,
            out,
            "auth",
            json!({"vm": vm, "uuid": uuid}),
            format!("{vm}: authorized shared pool {uuid}"),
        ),
        Command::Deauth { vm, uuid } => simple(
            &mut c,
            out,
            "deauth",
            json!({"vm": vm, "uuid": uuid}),
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

/// A command that only changes something: send it, then confirm in one
/// line (or print its `null` result with `--json`).
fn change(
    c: &mut ControlClient,
    out: &mut dyn Write,
    json: bool,
    command: &str,
    args: Value,
    done: String,
) -> Result<(), CtlError> {
    let result = c.call(command, args)?;
    if json {
        emit_json(out, &result)
    } else {
        emit(out, &format!("{done}\n"))
    }
}

fn sample(c: &mut ControlClient) -> Result<Sample, CtlError> {
    let result = c.call("status", json!({}))?;
    let at = Instant::now();
    let uptime = result.get("uptime_seconds").and_then(Value::as_f64);
    let stats = client::decode("status", result)?;
    Ok(Sample { at, stats, uptime })
}

fn status(
    c: &mut ControlClient,
    json: bool,
    interval: f64,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    if json {
        let result = c.call("status", json!({}))?;
        return emit_json(out, &result);
    }
    let first = sample(c)?;
    if interval <= 0.0 {
        return emit(out, &render::status(&first.stats, None, first.uptime));
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
        &render::status(&second.stats, Some(rate), second.uptime),
    )
}

fn list(c: &mut ControlClient, json: bool, out: &mut dyn Write) -> Result<(), CtlError> {
    let result = c.call("list", json!({}))?;
    if json {
        return emit_json(out, &result);
    }
    // One request: each entry of `list` carries the VM's store statistics.
    let vms: Vec<VmDetails> = client::decode("list", result)?;
    let summaries: Vec<VmSummary> = vms.iter().map(|d| d.info.clone()).collect();
    let clients: Vec<_> = vms.into_iter().map(|d| d.stats).collect();
    emit(out, &render::list(&summaries, &clients))
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

/// SIGINT and SIGTERM, blocked and received by a thread, so that `top`
/// notices them between frames and ends cleanly.
struct Interrupt {
    rx: mpsc::Receiver<i32>,
}

impl Interrupt {
    fn install() -> Result<Self, CtlError> {
        let set = crate::sys::SignalSet::block_termination()
            .map_err(|e| CtlError::System(format!("cannot set up signal handling: {e}")))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("vtmemctl-signals".to_string())
            .spawn(move || {
                if let Ok(sig) = set.wait() {
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
pub fn top(c: &mut ControlClient, opts: &TopOptions, out: &mut dyn Write) -> Result<(), CtlError> {
    let interrupt = Interrupt::install()?;
    let mut prev = sample(c)?;
    let mut frames = 0u64;
    loop {
        if interrupt.sleep(opts.interval) {
            break;
        }
        let vms: Vec<VmSummary> = c.call_as("list", json!({}))?;
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
