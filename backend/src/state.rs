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

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use vtmem_api::{ByteSize, VmName, VmSpec};

use crate::config::DaemonConfig;

/// Version of the state file format.
pub const STATE_VERSION: u32 = 1;

/// The state file's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Format version, [`STATE_VERSION`].
    pub version: u32,
    /// The store's host limit.
    pub host_limit: ByteSize,
    /// Every VM served when the file was written.
    pub vms: Vec<VmState>,
    /// VMs of the configuration file or flags removed at run time: they
    /// stay removed.
    #[serde(default)]
    pub removed: Vec<VmName>,
}

/// One VM in the state file: the fields of its spec (the control API's
/// `add-vm` arguments, parsed by [`VmSpec`]'s own rules, unknown fields
/// refused) and `frozen`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmState {
    /// Name and settings.
    pub spec: VmSpec,
    /// Puts refused.
    pub frozen: bool,
}

impl Serialize for VmState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut fields = match serde_json::to_value(&self.spec) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) => return Err(serde::ser::Error::custom("a VM spec is an object")),
            Err(e) => return Err(serde::ser::Error::custom(e)),
        };
        fields.insert("frozen".into(), self.frozen.into());
        fields.serialize(s)
    }
}

impl<'de> Deserialize<'de> for VmState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut fields = serde_json::Map::deserialize(d)?;
        let frozen = match fields.remove("frozen") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| D::Error::custom("frozen must be true or false"))?,
        };
        let spec =
            VmSpec::deserialize(serde_json::Value::Object(fields)).map_err(D::Error::custom)?;
        Ok(VmState { spec, frozen })
    }
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
    if state.host_limit.bytes() == 0 {
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
) -> Result<Vec<VmName>, StateError> {
    let err = |msg: String| StateError {
        path: path.to_path_buf(),
        msg: format!("{msg} (fix or remove the file)"),
    };
    let mut vms = Vec::new();
    let mut frozen = Vec::new();
    let mut names = BTreeSet::new();
    for v in &state.vms {
        let vm = &v.spec;
        if !names.insert(vm.name.clone()) {
            return Err(err(format!("VM '{}' is listed twice", vm.name)));
        }
        if v.frozen {
            frozen.push(vm.name.clone());
        }
        vms.push(vm.clone());
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

/// The state file of a running daemon. The daemon hands it snapshots;
/// it never looks at the daemon itself.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    /// VMs declared by the configuration file and flags.
    declared: BTreeSet<VmName>,
    /// Serialises writers.
    lock: Mutex<()>,
}

impl StateFile {
    /// A state file at `path`; `declared` are the configuration's VM names
    /// (before the state was applied).
    pub fn new(path: &Path, declared: impl IntoIterator<Item = VmName>) -> Self {
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

    /// The state of a daemon serving `vms` under `host_limit`.
    pub fn state(&self, host_limit: ByteSize, vms: Vec<VmState>) -> State {
        let removed = self
            .declared
            .iter()
            .filter(|n| !vms.iter().any(|v| &v.spec.name == *n))
            .cloned()
            .collect();
        State {
            version: STATE_VERSION,
            host_limit,
            vms,
            removed,
        }
    }

    /// Writes a snapshot atomically. `snapshot` is taken under the file's
    /// lock, so concurrent writers leave the newest state behind.
    pub fn save(&self, snapshot: impl FnOnce() -> State) -> Result<(), StateError> {
        let _guard = self.lock.lock();
        write_atomically(&self.path, &snapshot()).map_err(|e| StateError {
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

    fn vm(spec: &str) -> VmSpec {
        spec.parse().unwrap()
    }

    #[test]
    fn state_wins_new_config_vms_join_removed_stay_removed() {
        let mut config = DaemonConfig {
            socket_dir: "/x".into(),
            control_socket: "/x/ctl".into(),
            control_group: None,
            host_limit: ByteSize(1 << 30),
            device: Default::default(),
            vms: vec![vm("a"), vm("b"), vm("new,weight=7")],
            metrics_address: None,
            state_file: None,
            state_dir: None,
            sandbox: Default::default(),
        };
        let state = State {
            version: 1,
            host_limit: ByteSize(1 << 20),
            vms: vec![VmState {
                spec: vm("a,persistent-quota=4096,weight=300,dedup-group=web,auth=00112233-4455-6677-8899-aabbccddeeff"),
                frozen: true,
            }],
            removed: vec!["b".parse().unwrap()],
        };
        let frozen = apply(&state, &mut config, Path::new("s")).unwrap();
        assert_eq!(frozen, vec!["a".parse::<VmName>().unwrap()]);
        assert_eq!(config.host_limit, ByteSize(1 << 20));
        let names: Vec<&str> = config.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["a", "new"]);
        assert_eq!(config.vms[0].weight.get(), 300);
        assert_eq!(config.vms[0].persistent_quota.bytes(), 4096);
        assert_eq!(config.vms[1].weight.get(), 7);
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        assert!(load(&p).unwrap().is_none());
        for text in [
            "{not json",
            "{\"version\":2,\"host_limit\":1,\"vms\":[]}",
            "{\"version\":1,\"host_limit\":1,\"vms\":[],\"extra\":1}",
            "{\"version\":1,\"host_limit\":1,\"vms\":[{\"name\":\"a\",\"wieght\":1}]}",
            "{\"version\":1,\"host_limit\":1,\"vms\":[{\"name\":\"../a\"}]}",
            "{\"version\":1,\"host_limit\":1,\"vms\":[{\"name\":\"a\",\"frozen\":3}]}",
            "{\"version\":1,\"host_limit\":0,\"vms\":[]}",
        ] {
            std::fs::write(&p, text).unwrap();
            let e = load(&p).unwrap_err().to_string();
            assert!(e.starts_with("state file ") && !e.contains('\n'), "{e}");
        }
        let file = StateFile::new(&p, ["gone".parse().unwrap()]);
        let st = file.state(
            ByteSize(5),
            vec![VmState {
                spec: vm("a,dedup-group=g"),
                frozen: true,
            }],
        );
        assert_eq!(st.removed, vec!["gone".parse::<VmName>().unwrap()]);
        file.save(|| st.clone()).unwrap();
        assert_eq!(load(&p).unwrap(), Some(st));
        // The documented format: each VM is one flat object.
        let text: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(text["vms"][0]["name"], "a");
        assert_eq!(text["vms"][0]["dedup_group"], "g");
        assert_eq!(text["vms"][0]["frozen"], true);
    }
}
