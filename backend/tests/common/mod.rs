// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the integration tests of this package share: the binaries cargo
//! built for them, started and run through the test kit.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub use vtmem_testkit::*;

pub mod guest;

/// The daemon under test.
pub const VTMEMD: &str = env!("CARGO_BIN_EXE_vtmemd");
/// The control tool under test.
pub const VTMEMCTL: &str = env!("CARGO_BIN_EXE_vtmemctl");

/// Starts `vtmemd args...` in a private socket directory and waits until
/// it is ready.
pub fn vtmemd<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vtmemd {
    Vtmemd::start(VTMEMD, args)
}

/// Starts `vtmemd` with a `--vm` for each spec and more arguments.
pub fn vtmemd_with_vms(vms: &[&str], extra: &[&str]) -> Vtmemd {
    let mut args = Vec::new();
    for vm in vms {
        args.extend(["--vm", vm]);
    }
    args.extend_from_slice(extra);
    vtmemd(&args)
}

/// Runs `vtmemd args...` to its end (for flags that exit at once).
pub fn run_vtmemd(args: &[&str]) -> Output {
    run(Command::new(VTMEMD).args(args), DEADLINE)
}

/// Runs `vtmemctl args...`, `VTMEM_CONTROL_SOCKET` set to `env_socket` (or
/// removed).
pub fn vtmemctl_env(args: &[&str], env_socket: Option<&Path>) -> CtlOutput {
    let mut cmd = Command::new(VTMEMCTL);
    cmd.args(args);
    match env_socket {
        Some(p) => cmd.env("VTMEM_CONTROL_SOCKET", p),
        None => cmd.env_remove("VTMEM_CONTROL_SOCKET"),
    };
    run(&mut cmd, DEADLINE).into()
}

/// Runs `vtmemctl --socket <d's control socket> args...`.
pub fn ctl(d: &Vtmemd, args: &[&str]) -> CtlOutput {
    let control = d.control_path();
    let mut all = vec!["--socket", control.to_str().unwrap()];
    all.extend_from_slice(args);
    vtmemctl_env(&all, None)
}

/// `vtmemctl show --json VM`.
pub fn ctl_show(d: &Vtmemd, vm: &str) -> serde_json::Value {
    ctl(d, &["show", "--json", vm]).json()
}

/// `vtmemctl list --json`, as a map from VM name to its summary.
pub fn ctl_list(d: &Vtmemd) -> serde_json::Map<String, serde_json::Value> {
    let v = ctl(d, &["list", "--json"]).json();
    v.as_array()
        .expect("list is an array")
        .iter()
        .map(|vm| (vm["name"].as_str().unwrap().to_string(), vm.clone()))
        .collect()
}

/// A VM's `config` from `vtmemctl list --json`.
pub fn ctl_config(d: &Vtmemd, vm: &str) -> serde_json::Value {
    ctl_list(d)
        .get(vm)
        .unwrap_or_else(|| panic!("{vm} not listed"))["config"]
        .clone()
}

/// `u64::MAX`, how the control API reports an unlimited quota.
pub const UNLIMITED: u64 = u64::MAX;

/// The VM named `name` in a `list` result.
pub fn find_vm<'a>(list: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == serde_json::json!(name))
}
