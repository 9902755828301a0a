// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Recovery of one dedup domain's metadata from a state directory: its
//! checkpoint, the journal the checkpoint names, and a check of every
//! live content's slot against the arena's chunk directory, so that what
//! the store then adopts can be read without a panic (the slab trusts
//! the addresses it is given). `Store::recover` adopts what it returns.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use super::alloc::{class_of, class_size, CHUNK_BYTES, SLOT_BITS};
use super::content::ENTRY_BITS;
use super::journal::{read_journal, replay, JournalError, Replayed, Stored};
use super::snapshot::{read_snapshot, SnapshotError};
use super::state::{ChunkTag, StateDir};

/// Why a domain could not be recovered.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{0}: {1}")]
    Location(PathBuf, String),
    #[error("state directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
}

/// A recovered domain.
#[derive(Debug)]
pub struct RecoveredDomain {
    pub state: Replayed,
    /// The epoch the snapshot named.
    pub epoch: u64,
    /// Record places of the journal that were skipped (torn or unwritten
    /// at the crash).
    pub skipped: u64,
    /// Journals of the domain other than the one replayed (left by a
    /// checkpoint that a crash interrupted): to delete.
    pub stale: Vec<PathBuf>,
}

/// `DIR/d<domain>.snap`.
pub fn snapshot_path(dir: &StateDir, domain: u64) -> PathBuf {
    dir.path().join(format!("d{domain}.snap"))
}

/// `DIR/d<domain>.journal.<epoch>` (the epoch in 16 hex digits).
pub fn journal_path(dir: &StateDir, domain: u64, epoch: u64) -> PathBuf {
    dir.path().join(format!("d{domain}.journal.{epoch:016x}"))
}

/// Recovers domain `domain` of `dir`, whose arena listed `chunks`.
pub fn recover_domain(
    dir: &StateDir,
    domain: u64,
    chunks: &[ChunkTag],
) -> Result<RecoveredDomain, RecoverError> {
    let snap = read_snapshot(&snapshot_path(dir, domain))?;
    let jpath = journal_path(dir, domain, snap.epoch);
    let journal = read_journal(&jpath)?;
    if journal.epoch != snap.epoch || journal.domain != domain {
        return Err(RecoverError::Location(
            jpath,
            format!(
                "epoch {:#x} of domain {}, not the snapshot's {:#x} of domain {domain}",
                journal.epoch, journal.domain, snap.epoch
            ),
        ));
    }
    let state = replay(&jpath, snap.state, &journal.records)?;
    let domain32 = u32::try_from(domain).map_err(|_| {
        RecoverError::Location(
            jpath.clone(),
            format!("domain number {domain} out of range"),
        )
    })?;
    check_locations(&jpath, domain32, &state, chunks)?;
    let prefix = format!("d{domain}.journal.");
    let mut stale = Vec::new();
    let entries = fs::read_dir(dir.path()).map_err(|e| RecoverError::Dir(dir.path().into(), e))?;
    for e in entries {
        let e = e.map_err(|e| RecoverError::Dir(dir.path().into(), e))?;
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with(&prefix) && p != jpath {
            stale.push(p);
        }
    }
    stale.sort();
    Ok(RecoveredDomain {
        state,
        epoch: snap.epoch,
        skipped: journal.skipped,
        stale,
    })
}

/// Checks that every live content's slot lies in a chunk the arena lists,
/// of the content's domain, shard and size class, inside the chunk, and
/// that no two contents share a slot. `path` names the journal in errors.
pub fn check_locations(
    path: &Path,
    domain: u32,
    state: &Replayed,
    chunks: &[ChunkTag],
) -> Result<(), RecoverError> {
    let listed: HashSet<ChunkTag> = chunks.iter().copied().collect();
    let mut taken: HashMap<(u8, u8, u32), u32> = HashMap::new();
    let mut entries: Vec<(&u32, &Stored)> = state.contents.iter().collect();
    entries.sort_unstable_by_key(|(e, _)| **e);
    for (&entry, s) in entries {
        let Stored::Slot { addr, len, .. } = *s else {
            continue;
        };
        let bad = |what: String| {
            RecoverError::Location(path.to_path_buf(), format!("content entry {entry}: {what}"))
        };
        let class = class_of(usize::from(len));
        let tag = ChunkTag {
            domain,
            shard: (entry >> ENTRY_BITS) as u8,
            class: class as u8,
            chunk: addr >> SLOT_BITS,
        };
        let slot = addr & ((1 << SLOT_BITS) - 1);
        if !listed.contains(&tag) {
            return Err(bad(format!(
                "chunk {} of class {} of shard {} is not in the arena",
                tag.chunk, tag.class, tag.shard
            )));
        }
        if slot as usize >= CHUNK_BYTES / class_size(class) {
            return Err(bad(format!(
                "slot {slot} is past the end of its chunk (class {class})"
            )));
        }
        if let Some(other) = taken.insert((tag.shard, tag.class, addr), entry) {
            return Err(bad(format!(
                "slot {addr:#x} is also content entry {other}'s"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Form, JournalWriter, Record, ReplayedPool};
    use crate::snapshot::write_snapshot;
    use crate::state::StateDir;
    use vtmem_protocol::{ObjectId, POOL_PERSISTENT};

    fn slot(entry: u32, chunk: u32, slot: u32, len: u16) -> (u32, Stored) {
        (
            entry,
            Stored::Slot {
                addr: chunk << SLOT_BITS | slot,
                len,
                form: if len as usize == 4096 {
                    Form::Raw
                } else {
                    Form::Lz4
                },
            },
        )
    }

    fn tag(shard: u8, class: u8, chunk: u32) -> ChunkTag {
        ChunkTag {
            domain: 1,
            shard,
            class,
            chunk,
        }
    }

    #[test]
    fn slots_must_lie_in_listed_chunks_of_their_class_and_shard() {
        let p = Path::new("/state/d1.journal.0");
        let chunks = [tag(0, 0, 0), tag(1, 63, 2)];
        let check = |contents: &[(u32, Stored)]| {
            let state = Replayed {
                contents: contents.iter().copied().collect(),
                ..Default::default()
            };
            check_locations(p, 1, &state, &chunks).map_err(|e| e.to_string())
        };
        let shard1 = 1 << ENTRY_BITS;
        assert_eq!(
            check(&[
                slot(1, 0, 0, 64),
                slot(2, 0, 1023, 1),
                slot(shard1, 2, 15, 4096)
            ]),
            Ok(())
        );
        assert_eq!(
            check(&[slot(1, 0, 0, 65)]).unwrap_err(),
            "/state/d1.journal.0: content entry 1: chunk 0 of class 1 of shard 0 is not in the arena"
        );
        assert_eq!(
            check(&[slot(shard1 + 3, 2, 16, 4096)]).unwrap_err(),
            format!(
                "/state/d1.journal.0: content entry {}: slot 16 is past the end of its chunk (class 63)",
                shard1 + 3
            )
        );
        assert_eq!(
            check(&[slot(1, 0, 5, 10), slot(2, 0, 5, 20)]).unwrap_err(),
            "/state/d1.journal.0: content entry 2: slot 0x5 is also content entry 1's"
        );
        assert_eq!(
            check(&[slot(3, 2, 0, 4096)]).unwrap_err(),
            "/state/d1.journal.0: content entry 3: chunk 2 of class 63 of shard 0 is not in the arena"
        );
    }

    #[test]
    fn a_domain_is_recovered_from_its_snapshot_and_the_journal_it_names() {
        let top = tempfile::tempdir().unwrap();
        let d = StateDir::create(&top.path().join("s")).unwrap();
        // No snapshot: an error naming it.
        let e = recover_domain(&d, 1, &[]).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("snapshot {}: ", snapshot_path(&d, 1).display())),
            "{e}"
        );
        let mut base = Replayed::default();
        base.clients.entry(4).or_default().insert(
            0,
            ReplayedPool {
                flags: POOL_PERSISTENT,
                ..Default::default()
            },
        );
        write_snapshot(&snapshot_path(&d, 1), 7, 1, &base).unwrap();
        // The journal it names is missing.
        let e = recover_domain(&d, 1, &[]).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("journal {}: ", journal_path(&d, 1, 7).display())),
            "{e}"
        );
        // A journal of another domain under that name.
        drop(JournalWriter::create(&journal_path(&d, 1, 7), 7, 2, 4).unwrap());
        let e = recover_domain(&d, 1, &[]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: epoch 0x7 of domain 2, not the snapshot's 0x7 of domain 1",
                journal_path(&d, 1, 7).display()
            )
        );
        fs::remove_file(journal_path(&d, 1, 7)).unwrap();
        let w = JournalWriter::create(&journal_path(&d, 1, 7), 7, 1, 4).unwrap();
        let (e, addr) = (5, 3 << SLOT_BITS | 2);
        w.append(&Record::Content {
            entry: e,
            addr,
            len: 700,
            form: Form::Lz4,
        })
        .unwrap();
        let put = |content| Record::Put {
            client: 4,
            pool: 0,
            object: ObjectId([1, 1, 1]),
            index: 9,
            content,
            reserved: false,
        };
        w.append(&put(e)).unwrap();
        drop(w);
        // An interrupted checkpoint's journal, and another domain's.
        drop(JournalWriter::create(&journal_path(&d, 1, 8), 8, 1, 1).unwrap());
        drop(JournalWriter::create(&journal_path(&d, 2, 8), 8, 2, 1).unwrap());
        // The content's chunk is not listed: refused.
        let e = recover_domain(&d, 1, &[]).unwrap_err().to_string();
        assert!(
            e.contains("content entry 5: chunk 3 of class 10 of shard 0 is not in the arena"),
            "{e}"
        );
        let r = recover_domain(&d, 1, &[tag(0, 10, 3)]).unwrap();
        assert_eq!(r.epoch, 7);
        assert_eq!(r.skipped, 2);
        assert_eq!(r.stale, vec![journal_path(&d, 1, 8)]);
        assert_eq!(r.state.clients[&4][&0].pages[&(ObjectId([1, 1, 1]), 9)], 5);
        assert_eq!(r.state.contents.len(), 1);
    }
}
