// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The state directory (`--state-dir`): the store's crash-safe state
//! (docs/ARCHITECTURE.md, "Crash-safe state"), which outlives vtmemd.
//!
//! With a state directory the store keeps its persistent pages, and the
//! metadata to rebuild every index, in files mapped shared in that
//! directory while it runs ([`Store::open`]): there is nothing to write at
//! a stop, and a vtmemd that is killed (SIGKILL, a crash, the OOM killer)
//! loses no page a guest was told is stored. The next vtmemd on the same
//! directory recovers the store before it serves any VM.
//!
//! Recovered clients are matched to the declared VMs by name: a VM's
//! quotas, weight and authorisations come from the configuration, not the
//! state. A recovered client that no declared VM names keeps its pools
//! and pages in the store (and its charges against the host limit) and
//! waits until a VM of that name is added; `remove-vm` after that frees
//! them.

use std::collections::BTreeSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use vtmem_api::VmName;
use vtmem_store::{AdminHandle, ClientConfig, PersistError, Store, StoreConfig};

/// Why the state directory could not be used, or a VM not matched to it.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    /// The directory cannot be made.
    #[error("state directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    /// The store cannot create or recover its state there (the message
    /// names the file).
    #[error(transparent)]
    Open(#[from] PersistError),
    /// A recovered client's dedup group is not the configured one.
    #[error(
        "vm {vm}: the state in {dir} keeps its pages in dedup group {recorded}, \
         the configuration says {configured}; a client with a crash-safe state \
         cannot move to another dedup group yet: declare it with its recorded group, \
         or add it so and remove it (which frees its pages) before declaring it anew"
    )]
    DedupGroup {
        vm: VmName,
        dir: PathBuf,
        recorded: String,
        configured: String,
    },
}

/// What a start took back from the state directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// VMs that found their recovered client.
    pub vms: u32,
    /// Their pools.
    pub pools: u64,
    /// Their persistent pages.
    pub pages: u64,
    /// The bytes those pages are charged.
    pub bytes: u64,
    /// Time the store's recovery took.
    pub time: Duration,
}

/// The state directory of a daemon's store.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    /// The store's recovery, if it found a state.
    recovery: Option<vtmem_store::Recovered>,
    /// Recovered clients no served VM has claimed yet.
    waiting: Mutex<BTreeSet<String>>,
}

/// Opens the store of the state directory `path`: creates the directory
/// (mode 0700: the state holds guest memory) and a new state in it, or
/// recovers the state it holds.
pub fn open_store(
    path: &Path,
    config: StoreConfig,
) -> Result<(Arc<Store>, StateDir), StateDirError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| StateDirError::Dir(path.to_path_buf(), e))?;
    for warning in file_system_warnings(path, config.host_limit) {
        log::warn!("state directory {}: {warning}", path.display());
    }
    let (store, recovery) = Store::open(path, config)?;
    let waiting = if recovery.is_some() {
        store.client_names().into_iter().collect()
    } else {
        BTreeSet::new()
    };
    Ok((
        store,
        StateDir {
            path: path.to_path_buf(),
            recovery,
            waiting: Mutex::new(waiting),
        },
    ))
}

/// `TMPFS_MAGIC` of linux/magic.h: `statfs`'s type of a tmpfs.
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// What an administrator should know of the file system under the state
/// directory `path` for a host limit of `host_limit` bytes: the state
/// belongs on a tmpfs (elsewhere the arena is written back to a disk),
/// and one smaller than the limit fills before the store does (puts are
/// then refused, `NO_SPACE`). Nothing if it cannot be told.
pub fn file_system_warnings(path: &Path, host_limit: u64) -> Vec<String> {
    let Ok(fs) = rustix::fs::statfs(path) else {
        return Vec::new();
    };
    let mut warnings = Vec::new();
    if fs.f_type as u64 != TMPFS_MAGIC {
        warnings.push(
            "not a tmpfs: the pages are written back to its disk; put it on a tmpfs such as /run"
                .to_string(),
        );
    }
    let size = fs.f_blocks.saturating_mul(fs.f_bsize as u64);
    if size < host_limit {
        warnings.push(format!(
            "its file system holds {} bytes, less than the host limit ({host_limit} bytes): \
             once it is full, puts are refused (NO_SPACE)",
            size
        ));
    }
    warnings
}

/// Gives the state directory `path` and its files to `uid` (and `gid`),
/// who will serve it (`--user`) and make and remove its files (journals,
/// snapshots) from now on; a later vtmemd started as that user can then
/// recover it. Nothing to do if the process already runs as `uid`.
pub fn give_to(path: &Path, uid: u32, gid: Option<u32>) -> Result<(), StateDirError> {
    if rustix::process::geteuid().as_raw() == uid {
        return Ok(());
    }
    let fail = |p: &Path| {
        let p = p.to_path_buf();
        move |e| StateDirError::Dir(p, e)
    };
    for e in std::fs::read_dir(path).map_err(fail(path))? {
        let p = e.map_err(fail(path))?.path();
        std::os::unix::fs::lchown(&p, Some(uid), gid).map_err(fail(&p))?;
    }
    std::os::unix::fs::chown(path, Some(uid), gid).map_err(fail(path))
}

impl StateDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store's recovery at start, if there was a state to recover.
    pub fn recovery(&self) -> Option<&vtmem_store::Recovered> {
        self.recovery.as_ref()
    }

    /// Recovered clients that no VM claimed yet, by name.
    pub fn waiting(&self) -> Vec<String> {
        self.waiting.lock().iter().cloned().collect()
    }

    /// The recovered client of VM `name`, if there is one no VM claimed
    /// yet, configured as `config` says. On error it stays unclaimed.
    pub fn claim(
        &self,
        store: &Store,
        name: &VmName,
        config: &ClientConfig,
    ) -> Result<Option<AdminHandle>, StateDirError> {
        let mut waiting = self.waiting.lock();
        if !waiting.contains(name.as_str()) {
            return Ok(None);
        }
        let Some(client) = store.client(name.as_str()) else {
            waiting.remove(name.as_str());
            return Ok(None);
        };
        let now = client.config();
        if now.dedup_group != config.dedup_group {
            let show = |g: &Option<String>| g.clone().unwrap_or_else(|| "none".into());
            return Err(StateDirError::DedupGroup {
                vm: name.clone(),
                dir: self.path.clone(),
                recorded: show(&now.dedup_group),
                configured: show(&config.dedup_group),
            });
        }
        client.set_quota(config.persistent_quota, config.ephemeral_quota);
        if client.set_weight(config.weight).is_err() {
            // A VM spec's weight is at least 1; keep the recovered one.
        }
        for uuid in &now.authorized_uuids {
            if !config.authorized_uuids.contains(uuid) {
                client.deauthorize(*uuid);
            }
        }
        for uuid in &config.authorized_uuids {
            client.authorize(*uuid);
        }
        waiting.remove(name.as_str());
        Ok(Some(client))
    }

    /// Gives a claimed client back (its VM could not be added after all):
    /// it waits again.
    pub fn unclaim(&self, name: &VmName) {
        self.waiting.lock().insert(name.as_str().to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::{file_system_warnings, TMPFS_MAGIC};

    fn is_tmpfs(p: &std::path::Path) -> bool {
        rustix::fs::statfs(p).is_ok_and(|f| f.f_type as u64 == TMPFS_MAGIC)
    }

    #[test]
    fn a_small_or_disk_file_system_is_named() {
        let shm = std::path::Path::new("/dev/shm");
        if is_tmpfs(shm) {
            assert!(file_system_warnings(shm, 4096).is_empty());
            let w = file_system_warnings(shm, u64::MAX);
            assert!(
                w.len() == 1 && w[0].contains("less than the host limit"),
                "{w:?}"
            );
        }
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        if !is_tmpfs(dir.path()) {
            let w = file_system_warnings(dir.path(), 4096);
            assert!(w.iter().any(|w| w.contains("not a tmpfs")), "{w:?}");
        }
    }
}
