// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The state file (`--state-file`): what the control socket changed, so
//! that it survives a restart of `vtmemd`.
//!
//! The file is JSON, rewritten atomically (temporary file, `fsync`,
//! `rename`, `fsync` of the directory) after every successful change. It
//! records the host limit, every VM served with its quotas, weight, dedup
//! group, authorised UUIDs and frozen flag, and the VMs of the
//! configuration that were removed at run time. At start it is applied
//! over the configuration file and flags (see [`apply`]). Pages are never
//! in it: the store lives in memory.

use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{
    format_uuid, parse_uuid, validate_dedup_group, validate_vm_name, validate_weight, DaemonConfig,
    VmConfig,
};
use crate::daemon::Daemon;
use vtmem_store::ClientConfig;

/// Version of the state file format.
pub const STATE_VERSION: u32 = 1;

/// The state file's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Format version, [`STATE_VERSION`].
    pub version: u32,
    /// The store's host limit in bytes.
    pub host_limit: u64,
    /// Every VM served when the file was written.
    pub vms: Vec<VmState>,
    /// VMs of the configuration file or flags removed at run time: they
    /// stay removed.
    #[serde(default)]
    pub removed: Vec<String>,
}

/// One VM in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// Name.
    pub name: String,
    /// Persistent quota, bytes (18446744073709551615: unlimited).
    pub persistent_quota: u64,
    /// Ephemeral quota, bytes.
    pub ephemeral_quota: u64,
    /// Weight.
    pub weight: u32,
    /// Dedup group.
    #[serde(default)]
    pub dedup_group: Option<String>,
    /// Authorised shared-pool UUIDs (8-4-4-4-12).
    #[serde(default)]
    pub authorized_uuids: Vec<String>,
    /// Puts refused.
    #[serde(default)]
    pub frozen: bool,
}

/// A state file that cannot be read, parsed or written.
#[derive(Debug, thiserror::Error)]
#[error("state file {}: {msg}", path.display())]
pub struct StateError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong (one line).
    pub msg: String,
}

impl VmState {
    fn to_vm_config(&self) -> Result<VmConfig, String> {
        validate_vm_name(&self.name).map_err(|e| e.to_string())?;
        let mut client = ClientConfig {
            persistent_quota: self.persistent_quota,
            ephemeral_quota: self.ephemeral_quota,
            weight: validate_weight(u64::from(self.weight)).map_err(|e| e.to_string())?,
            dedup_group: None,
            authorized_uuids: Vec::new(),
        };
        if let Some(g) = &self.dedup_group {
            validate_dedup_group(g).map_err(|e| e.to_string())?;
            client.dedup_group = Some(g.clone());
        }
        for u in &self.authorized_uuids {
            let uuid = parse_uuid(u).map_err(|e| e.to_string())?;
            if !client.authorized_uuids.contains(&uuid) {
                client.authorized_uuids.push(uuid);
            }
        }
        Ok(VmConfig {
            name: self.name.clone(),
            client,
        })
    }
}

/// Reads a state file: `Ok(None)` if it does not exist.
pub fn load(path: &Path) -> Result<Option<State>, StateError> {
    let err = |msg: String| StateError {
        path: path.to_path_buf(),
        msg: format!("{msg} (fix or remove the file)"),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    let state: State = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    if state.version != STATE_VERSION {
        return Err(err(format!(
            "unsupported version {} (this vtmemd writes {STATE_VERSION})",
            state.version
        )));
    }
    if state.host_limit == 0 {
        return Err(err("host_limit is 0".to_string()));
    }
    Ok(Some(state))
}

/// Applies a state over the configuration: the state's host limit; the
/// state's VMs with their settings (replacing the configuration's VMs of
/// the same name); then the configuration's other VMs, except those the
/// state lists as removed. Returns the names of the VMs to freeze.
pub fn apply(
    state: &State,
    config: &mut DaemonConfig,
    path: &Path,
) -> Result<Vec<String>, StateError> {
    let err = |msg: String| StateError {
        path: path.to_path_buf(),
        msg: format!("{msg} (fix or remove the file)"),
    };
    let mut vms = Vec::new();
    let mut frozen = Vec::new();
    let mut names = BTreeSet::new();
    for v in &state.vms {
        let vm = v.to_vm_config().map_err(&err)?;
        if !names.insert(vm.name.clone()) {
            return Err(err(format!("VM '{}' is listed twice", vm.name)));
        }
        if v.frozen {
            frozen.push(vm.name.clone());
        }
        vms.push(vm);
    }
    for vm in &config.vms {
        if !names.contains(&vm.name) && !state.removed.contains(&vm.name) {
            vms.push(vm.clone());
        }
    }
    config.vms = vms;
    config.host_limit = state.host_limit;
    Ok(frozen)
}

/// The state file of a running daemon.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    /// VMs declared by the configuration file and flags.
    declared: BTreeSet<String>,
    /// Serialises writers.
    lock: Mutex<()>,
}

impl StateFile {
    /// A state file at `path`; `declared` are the configuration's VM names
    /// (before the state was applied).
    pub fn new(path: &Path, declared: impl IntoIterator<Item = String>) -> Self {
        StateFile {
            path: path.to_path_buf(),
            declared: declared.into_iter().collect(),
            lock: Mutex::new(()),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The daemon's state now.
    pub fn snapshot(&self, daemon: &Daemon) -> State {
        let vms: Vec<VmState> = daemon
            .vms()
            .iter()
            .map(|vm| {
                let c = vm.client().config();
                VmState {
                    name: vm.name().to_string(),
                    persistent_quota: c.persistent_quota,
                    ephemeral_quota: c.ephemeral_quota,
                    weight: c.weight,
                    dedup_group: c.dedup_group.clone(),
                    authorized_uuids: c.authorized_uuids.iter().map(format_uuid).collect(),
                    frozen: vm.client().is_frozen(),
                }
            })
            .collect();
        let removed = self
            .declared
            .iter()
            .filter(|n| !vms.iter().any(|v| &v.name == *n))
            .cloned()
            .collect();
        State {
            version: STATE_VERSION,
            host_limit: daemon.store().host_limit(),
            vms,
            removed,
        }
    }

    /// Writes the daemon's state atomically.
    pub fn save(&self, daemon: &Daemon) -> Result<(), StateError> {
        let _guard = self.lock.lock();
        let state = self.snapshot(daemon);
        write_atomically(&self.path, &state).map_err(|e| StateError {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }
}

fn write_atomically(path: &Path, state: &State) -> io::Result<()> {
    let mut text = serde_json::to_string_pretty(state).map_err(io::Error::other)?;
    text.push('\n');
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, weight: u32) -> VmConfig {
        let mut v = VmConfig::new(name).unwrap();
        v.client.weight = weight;
        v
    }

    #[test]
    fn state_wins_new_config_vms_join_removed_stay_removed() {
        let mut config = DaemonConfig {
            socket_dir: "/x".into(),
            control_socket: "/x/ctl".into(),
            control_group: None,
            host_limit: 1 << 30,
            device: Default::default(),
            vms: vec![vm("a", 100), vm("b", 100), vm("new", 7)],
            metrics_address: None,
            state_file: None,
        };
        let state = State {
            version: 1,
            host_limit: 1 << 20,
            vms: vec![VmState {
                name: "a".into(),
                persistent_quota: 4096,
                ephemeral_quota: u64::MAX,
                weight: 300,
                dedup_group: Some("web".into()),
                authorized_uuids: vec!["00112233-4455-6677-8899-aabbccddeeff".into()],
                frozen: true,
            }],
            removed: vec!["b".into()],
        };
        let frozen = apply(&state, &mut config, Path::new("s")).unwrap();
        assert_eq!(frozen, vec!["a".to_string()]);
        assert_eq!(config.host_limit, 1 << 20);
        let names: Vec<&str> = config.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["a", "new"]);
        assert_eq!(config.vms[0].client.weight, 300);
        assert_eq!(config.vms[0].client.persistent_quota, 4096);
        assert_eq!(config.vms[1].client.weight, 7);
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        let dir = std::env::temp_dir().join(format!("vtmem-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state.json");
        assert!(load(&p).unwrap().is_none());
        for text in [
            "{not json",
            "{\"version\":2,\"host_limit\":1,\"vms\":[]}",
            "{\"version\":1,\"host_limit\":1,\"vms\":[],\"extra\":1}",
        ] {
            std::fs::write(&p, text).unwrap();
            let e = load(&p).unwrap_err().to_string();
            assert!(e.starts_with("state file ") && !e.contains('\n'), "{e}");
        }
        let st = State {
            version: 1,
            host_limit: 5,
            vms: Vec::new(),
            removed: Vec::new(),
        };
        write_atomically(&p, &st).unwrap();
        assert_eq!(load(&p).unwrap(), Some(st));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
