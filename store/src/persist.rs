// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The store's side of the crash-safe state (docs/ARCHITECTURE.md,
//! "Crash-safe state"): the state directory a store writes, each dedup
//! domain's journal, and the store's hashing seed.
//!
//! ```text
//! DIR/seed     "VTMEMSED" | seed u64 | xxh3-64 of bytes 0..16
//! DIR/dN.snap, DIR/dN.journal.EPOCH   per domain N (recover.rs)
//! ```
//!
//! The seed keys content hashes, which choose a content's shard: a
//! recovered content must hash to the shard its entry number names, so
//! the seed outlives the process with the rest of the state.

use std::fs;
use std::hash::BuildHasher;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64;

use super::clients::ClientsFile;
use super::journal::{JournalError, JournalWriter, Record, Replayed};
use super::recover::{journal_path, snapshot_path, RecoverError};
use super::snapshot::{write_snapshot, SnapshotError};
use super::state::{Arena, StateDir, StateError};

/// Records a domain's journal has room for. The checkpoint that would
/// bound a journal to 16 bytes per live page is not built yet: until it
/// is, a journal is started afresh only when the store is recovered, and
/// one that fills up stops recording (an error is logged for each record
/// lost). The file is sparse: memory is taken only as records are written.
pub const JOURNAL_RECORDS: u64 = 1 << 22;

/// First bytes of `DIR/seed`.
const SEED_MAGIC: [u8; 8] = *b"VTMEMSED";

/// Why a store could not create, open or recover its state directory.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Recover(#[from] RecoverError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{0}: {1}")]
    Corrupt(PathBuf, String),
}

/// A store's state directory, its arena and clients file.
#[derive(Debug)]
pub(crate) struct Persist {
    pub dir: StateDir,
    pub arena: Arc<Arena>,
    pub clients: Mutex<ClientsFile>,
}

/// One dedup domain's journal.
#[derive(Debug)]
pub struct DomainLog {
    /// The domain's durable number.
    pub number: u32,
    journal: JournalWriter,
    /// Records that could not be written (a full journal).
    lost: AtomicU64,
}

/// A random number (for seeds and epochs).
pub(crate) fn random_u64() -> u64 {
    let rs = std::collections::hash_map::RandomState::new();
    rs.hash_one(std::time::SystemTime::now())
}

impl DomainLog {
    /// Starts domain `number`'s files from `state`: a new journal with a
    /// new epoch, then the snapshot of `state` naming it (renamed over
    /// the old one), then every other journal of the domain is deleted.
    /// A crash before the rename leaves the old snapshot and journal;
    /// after it, the new ones.
    pub(crate) fn start(
        dir: &StateDir,
        number: u32,
        state: &Replayed,
    ) -> Result<DomainLog, PersistError> {
        let domain = u64::from(number);
        let mut epoch = random_u64();
        while journal_path(dir, domain, epoch).exists() {
            epoch = epoch.wrapping_add(1);
        }
        let jpath = journal_path(dir, domain, epoch);
        let journal = JournalWriter::create(&jpath, epoch, domain, JOURNAL_RECORDS)?;
        write_snapshot(&snapshot_path(dir, domain), epoch, domain, state)?;
        let prefix = format!("d{domain}.journal.");
        let entries =
            fs::read_dir(dir.path()).map_err(|e| StateError::Io(dir.path().to_path_buf(), e))?;
        for e in entries.flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with(&prefix) && p != jpath {
                if let Err(err) = fs::remove_file(&p) {
                    log::warn!("{}: not deleted: {err}", p.display());
                }
            }
        }
        Ok(DomainLog {
            number,
            journal,
            lost: AtomicU64::new(0),
        })
    }

    /// Appends `r`. A full journal loses the record (and logs it): see
    /// [`JOURNAL_RECORDS`].
    pub fn append(&self, r: &Record) {
        if let Err(e) = self.journal.append(r) {
            if self.lost.fetch_add(1, Ordering::Relaxed) == 0 {
                log::error!("domain {}: {e}; records are being lost", self.number);
            }
        }
    }
}

/// Deletes domain `number`'s files (a domain no client uses any more).
pub(crate) fn remove_domain_files(dir: &StateDir, number: u64) {
    let snap = format!("d{number}.snap");
    let prefix = format!("d{number}.journal.");
    let Ok(entries) = fs::read_dir(dir.path()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == snap || name.starts_with(&prefix) || name == format!("{snap}.new") {
            if let Err(err) = fs::remove_file(e.path()) {
                log::warn!("{}: not deleted: {err}", e.path().display());
            }
        }
    }
}

/// Writes `DIR/seed`.
pub(crate) fn write_seed(dir: &StateDir, seed: u64) -> Result<(), PersistError> {
    let p = dir.path().join("seed");
    let mut b = SEED_MAGIC.to_vec();
    b.extend_from_slice(&seed.to_le_bytes());
    let check = xxh3_64(&b);
    b.extend_from_slice(&check.to_le_bytes());
    let io = |e: io::Error| StateError::Io(p.clone(), e);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .map_err(io)?;
    io::Write::write_all(&mut f, &b).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

/// Reads `DIR/seed`.
#[allow(dead_code)] // recovery uses it next
pub(crate) fn read_seed(dir: &StateDir) -> Result<u64, PersistError> {
    let p = dir.path().join("seed");
    let b = fs::read(&p).map_err(|e| StateError::Io(p.clone(), e))?;
    if b.len() != 24 || b[..8] != SEED_MAGIC || b[16..] != xxh3_64(&b[..16]).to_le_bytes() {
        return Err(PersistError::Corrupt(
            p,
            "not a seed file, or it fails its check".into(),
        ));
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[8..16]);
    Ok(u64::from_le_bytes(w))
}

#[cfg(test)]
mod tests {
    use crate::journal::ZERO_CONTENT;
    use crate::recover::recover_domain;
    use crate::state::{Arena, StateDir};
    use crate::*;

    #[test]
    fn the_journal_replays_to_the_stores_pages() {
        let top = tempfile::tempdir().unwrap();
        let p = top.path().join("state");
        let store = Store::create(
            &p,
            StoreConfig {
                host_limit: 64 << 20,
            },
        )
        .unwrap();
        let c = store
            .add_client("a", ClientConfig::default())
            .unwrap()
            .data();
        assert_eq!(c.new_pool(PoolSpec::persistent()).unwrap(), 0);
        assert_eq!(c.new_pool(PoolSpec::ephemeral()).unwrap(), 1);
        let h = |pool, index| Handle {
            pool,
            object: ObjectId([1, 2, 3]),
            index,
        };
        let mut text = [0u8; PAGE_SIZE];
        for (i, b) in text.iter_mut().enumerate() {
            *b = b"persistent pages live in the arena "[i % 35];
        }
        c.put(&h(0, 0), &text, false).unwrap();
        c.put(&h(0, 1), &text, false).unwrap();
        c.put(&h(0, 2), &[0u8; PAGE_SIZE], false).unwrap();
        c.put(&h(0, 3), &[7u8; PAGE_SIZE], false).unwrap();
        c.put(&h(1, 0), &text, false).unwrap();
        c.flush_page(&h(0, 1)).unwrap();
        assert_eq!(c.reserve(0, 5).unwrap(), 5);
        c.put(&h(0, 4), &text, true).unwrap();
        drop(c);
        drop(store);
        let dir = StateDir::open(&p).unwrap();
        let (_arena, chunks) = Arena::open(&dir).unwrap();
        let tags: Vec<_> = chunks.iter().map(|(t, _)| *t).collect();
        let r = recover_domain(&dir, 1, &tags).unwrap();
        let pools = &r.state.clients[&1];
        assert_eq!(pools.len(), 2, "the ephemeral pool's id is kept");
        assert!(pools[&1].pages.is_empty());
        let p0 = &pools[&0];
        assert_eq!(p0.reserved, 4);
        let pages: Vec<u64> = p0.pages.keys().map(|(_, i)| *i).collect();
        assert_eq!(pages, vec![0, 2, 3, 4]);
        assert_eq!(p0.pages[&(ObjectId([1, 2, 3]), 2)], ZERO_CONTENT);
        assert_eq!(
            p0.pages[&(ObjectId([1, 2, 3]), 0)],
            p0.pages[&(ObjectId([1, 2, 3]), 4)]
        );
        // One text content in a slot, one pattern.
        assert_eq!(r.state.contents.len(), 2);
    }
}
