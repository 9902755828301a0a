// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `vtmemd` the benchmarks start, through the test kit's fixture.

use std::path::{Path, PathBuf};

use vtmem_testkit::Vtmemd;

use crate::{Error, Result};

/// The `vtmemd` binary: `given` (`--vtmemd`, or `$VTMEMD`), else the one
/// next to this executable (cargo builds both into the same target
/// directory: `cargo build --release -p vtmem-backend --bin vtmemd`).
pub fn vtmemd_binary(given: Option<&Path>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(Error::Io)?
            .with_file_name("vtmemd"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Daemon(format!(
            "{} is not a file: build vtmemd in this target directory \
             (cargo build -p vtmem-backend --bin vtmemd, with --release for a \
             release build) or name it with --vtmemd",
            path.display()
        )))
    }
}

/// Starts `binary` with a `--vm` for each of `vms` and the `extra`
/// arguments, and waits until it is ready.
pub fn start(binary: &Path, vms: &[String], extra: &[String]) -> Result<Vtmemd> {
    Vtmemd::try_start(binary, &args(vms, extra)).map_err(|e| Error::Daemon(e.to_string()))
}

/// The arguments [`start`] passes.
pub fn args(vms: &[String], extra: &[String]) -> Vec<String> {
    let mut args = Vec::with_capacity(2 * vms.len() + extra.len());
    for vm in vms {
        args.push("--vm".to_string());
        args.push(vm.clone());
    }
    args.extend_from_slice(extra);
    args
}
