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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use xxhash_rust::xxh3::xxh3_64;

use super::clients::ClientsFile;
use super::journal::{JournalError, JournalWriter, Record, Replayed, RECORD_BYTES};
use super::recover::{journal_path, snapshot_path, RecoverError};
use super::snapshot::{write_snapshot, SnapshotError};
use super::state::{Arena, StateDir, StateError};
use super::Store;

/// Records a domain's journal has room for, at least: twice the bound
/// that starts a checkpoint ([`checkpoint_bound`]), or more for a large
/// domain. A journal that nears its end all the same (its checkpoint
/// could not run) refuses operations that add to the state
/// ([`DomainLog::has_room`]); one that fills up loses further records
/// (removals) and logs an error. The file is sparse:
/// memory is taken only as records are written.
pub const JOURNAL_RECORDS: u64 = 1 << 22;

/// Records a journal keeps free for operations already started when
/// operations that would add to the state are refused (see
/// [`DomainLog::has_room`]): each writes a few records (a put at most
/// three), and no more than a few hundred run at once.
pub const JOURNAL_MARGIN: u64 = 1 << 16;

/// Records a journal keeps allocated on its file system past its tail, at
/// least, for operations that found room: each writes at most three
/// records, and one runs at a time per queue worker.
pub const ALLOCATED_MARGIN: u64 = 1024;

/// Whether a journal has room for an operation that adds to the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    Yes,
    /// Within its margin of its capacity: a checkpoint is due.
    JournalFull,
    /// Its file system has no room for places ahead of its tail.
    FileSystemFull,
}

/// Fewest records a journal holds before a checkpoint is due (1 MiB).
pub const MIN_CHECKPOINT_RECORDS: u64 = 16384;

/// Records after which a domain of `pages` persistent pages is
/// checkpointed: 16 bytes per page (a record is 64), at least
/// [`MIN_CHECKPOINT_RECORDS`].
pub fn checkpoint_bound(pages: u64) -> u64 {
    (pages / 4).max(MIN_CHECKPOINT_RECORDS)
}

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
    /// Appends take it for reading; a checkpoint swaps the journal under
    /// it (with every lock of the domain held, so no append is waiting).
    journal: RwLock<JournalWriter>,
    /// Records that could not be written (a full journal).
    lost: AtomicU64,
    /// Records kept free (see [`DomainLog::has_room`]).
    margin: AtomicU64,
    /// Records after which a checkpoint is due.
    pub(crate) bound: AtomicU64,
    /// A checkpoint is due.
    due: AtomicBool,
    /// The journal may be near its end: [`DomainLog::has_room`] must look.
    /// Set by the append that passes `capacity - 2 × margin` records (and
    /// by a margin change), cleared by a new journal; so that puts, which
    /// check for room first, need not take the journal's lock to learn
    /// that it is far from full.
    tight: AtomicBool,
    /// The journal's file system had no room at the last look.
    no_room: AtomicBool,
    /// Held by the one checkpoint running.
    pub(crate) checkpointing: Mutex<()>,
}

/// Persistent pages of a replayed state.
fn pages_of(state: &Replayed) -> u64 {
    state
        .clients
        .values()
        .flat_map(|pools| pools.values())
        .map(|p| p.pages.len() as u64)
        .sum()
}

/// Creates a new journal of domain `number` with room for `records`.
fn new_journal(dir: &StateDir, number: u32, records: u64) -> Result<JournalWriter, PersistError> {
    let domain = u64::from(number);
    let mut epoch = random_u64();
    while journal_path(dir, domain, epoch).exists() {
        epoch = epoch.wrapping_add(1);
    }
    Ok(JournalWriter::create(
        &journal_path(dir, domain, epoch),
        epoch,
        domain,
        records,
    )?)
}

/// Deletes every journal of domain `number` but `keep`.
fn delete_other_journals(dir: &StateDir, number: u32, keep: &std::path::Path) {
    let prefix = format!("d{number}.journal.");
    let Ok(entries) = fs::read_dir(dir.path()) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with(&prefix) && p != keep {
            if let Err(err) = fs::remove_file(&p) {
                log::warn!("{}: not deleted: {err}", p.display());
            }
        }
    }
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
        let bound = checkpoint_bound(pages_of(state));
        let journal = new_journal(dir, number, JOURNAL_RECORDS.max(2 * bound))?;
        write_snapshot(
            &snapshot_path(dir, u64::from(number)),
            journal.epoch(),
            u64::from(number),
            state,
        )?;
        delete_other_journals(dir, number, journal.path());
        Ok(DomainLog {
            number,
            journal: RwLock::new(journal),
            lost: AtomicU64::new(0),
            margin: AtomicU64::new(JOURNAL_MARGIN),
            bound: AtomicU64::new(bound),
            due: AtomicBool::new(false),
            tight: AtomicBool::new(false),
            no_room: AtomicBool::new(false),
            checkpointing: Mutex::new(()),
        })
    }

    /// The checkpoint itself, once its caller holds every lock of the
    /// domain (so that no record is being appended) and built `state`, the
    /// domain's live metadata: a new journal, the snapshot of `state`
    /// naming it (renamed over the old), the swap, then the old journal
    /// deleted. A crash before the rename leaves the old snapshot and
    /// journal, which replay to `state`; after it, the new ones.
    pub(crate) fn restart(&self, dir: &StateDir, state: &Replayed) -> Result<(), PersistError> {
        let bound = checkpoint_bound(pages_of(state));
        let journal = new_journal(dir, self.number, JOURNAL_RECORDS.max(2 * bound))?;
        write_snapshot(
            &snapshot_path(dir, u64::from(self.number)),
            journal.epoch(),
            u64::from(self.number),
            state,
        )?;
        let keep = journal.path().to_path_buf();
        drop(std::mem::replace(&mut *self.journal.write(), journal));
        delete_other_journals(dir, self.number, &keep);
        self.bound.store(bound, Ordering::Relaxed);
        self.due.store(false, Ordering::Release);
        self.tight
            .store(self.near_end(&self.journal.read()), Ordering::Release);
        Ok(())
    }

    /// Whether the journal holds more records than its bound.
    pub fn is_due(&self) -> bool {
        self.due.load(Ordering::Acquire)
    }

    /// Whether journal `j` comes within twice the margin of its end, or
    /// within twice [`ALLOCATED_MARGIN`] of its allocation: what
    /// [`DomainLog::is_tight`] says. Twice: the records taken between the
    /// append that learns it and the next put's look stay within the
    /// margin.
    fn near_end(&self, j: &JournalWriter) -> bool {
        let margin = self.margin.load(Ordering::Relaxed);
        let used = j.len() / RECORD_BYTES as u64;
        let records = j.capacity() / RECORD_BYTES as u64;
        used.saturating_add(margin.saturating_mul(2)) >= records
            || j.allocated_ahead() < 2 * ALLOCATED_MARGIN
    }

    /// Whether the journal may be near its end (if not, it has room).
    pub fn is_tight(&self) -> bool {
        self.tight.load(Ordering::Acquire)
    }

    /// Whether the journal has room for more than its margin of records:
    /// operations that add to the state (a put into a persistent pool, a
    /// new pool, a reservation) are refused when it has not, once a
    /// checkpoint was tried, so that no answered operation's record is
    /// lost to a full journal. Removals are not refused (docs/
    /// ARCHITECTURE.md, "A full file system", says what a lost one does).
    pub fn has_room(&self) -> bool {
        self.room() == Room::Yes
    }

    /// Whether the journal has room for an operation that adds to the
    /// state, or why not (see [`DomainLog::has_room`]). Looking also
    /// allocates places ahead on the file system, and clears
    /// [`DomainLog::is_tight`] when the journal is far from both ends
    /// again.
    pub fn room(&self) -> Room {
        let j = self.journal.read();
        let margin = self.margin.load(Ordering::Relaxed);
        let in_capacity = margin
            .checked_mul(RECORD_BYTES as u64)
            .and_then(|m| m.checked_add(j.len()))
            .is_some_and(|need| need <= j.capacity());
        if !in_capacity {
            return Room::JournalFull;
        }
        if let Err(e) = j.allocate_ahead(2 * ALLOCATED_MARGIN) {
            if !self.no_room.swap(true, Ordering::Relaxed) {
                log::error!(
                    "domain {}: {e}; operations that add to the state are refused until there is",
                    self.number
                );
            }
            return Room::FileSystemFull;
        }
        if self.no_room.swap(false, Ordering::Relaxed) {
            log::warn!("domain {}: its journal has room again", self.number);
        }
        if !self.near_end(&j) {
            self.tight.store(false, Ordering::Release);
        }
        Room::Yes
    }

    /// Sets the records kept free (for tests: a margin past the capacity
    /// makes the journal refuse every operation that adds to the state).
    #[doc(hidden)]
    pub fn set_margin(&self, records: u64) {
        self.margin.store(records, Ordering::Relaxed);
        self.tight.store(true, Ordering::Release);
    }

    /// Appends `r`. A full journal loses the record (and logs it): see
    /// [`JOURNAL_RECORDS`]; operations that add to the state check
    /// [`DomainLog::has_room`] first.
    pub fn append(&self, r: &Record) {
        let j = self.journal.read();
        match j.append(r) {
            Ok(n) => {
                if n >= self.bound.load(Ordering::Relaxed) && !self.due.load(Ordering::Relaxed) {
                    self.due.store(true, Ordering::Release);
                }
                if !self.tight.load(Ordering::Relaxed) && self.near_end(&j) {
                    self.tight.store(true, Ordering::Release);
                }
            }
            Err(e) => {
                self.due.store(true, Ordering::Release);
                self.tight.store(true, Ordering::Release);
                if self.lost.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::error!("domain {}: {e}; records are being lost", self.number);
                }
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

/// How a store was recovered from its state directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Clients rebuilt.
    pub clients: u64,
    /// Pools rebuilt (ephemeral ones empty).
    pub pools: u64,
    /// Persistent pages rebuilt.
    pub pages: u64,
    /// Unique contents adopted in the arena.
    pub contents: u64,
    /// Journal record places skipped (torn or never written at the crash).
    pub skipped_records: u64,
    /// Time the recovery took.
    pub elapsed: std::time::Duration,
}

impl Store {
    /// Rebuilds a store from the state directory `path` that a store
    /// created ([`Store::create`]) and stopped or died with: its clients,
    /// pools (ephemeral ones keep their ids, not their pages), persistent
    /// pages with their contents adopted where they lie in the arena, the
    /// dedup index (hashes recomputed), reference counts, charges and
    /// reservations. Each domain is then checkpointed: a snapshot of what
    /// was recovered and a new, empty journal.
    ///
    /// Recovered clients have the default configuration (unlimited
    /// quotas, weight 100, no authorisation) but their dedup group: the
    /// caller applies its own, as for clients it adds. Charges are taken whatever the quotas, as
    /// an image import would take them.
    ///
    /// A state that fails a check (a truncated or corrupt file, a record
    /// that cannot follow the ones before it, a slot outside the arena's
    /// chunks) is an error naming the file; nothing read from the files
    /// can make the store panic.
    pub fn recover(
        path: &std::path::Path,
        config: super::StoreConfig,
    ) -> Result<(Arc<Store>, Recovered), PersistError> {
        use super::account::{self, Acct};
        use super::client::{Client, Meta, Table};
        use super::content::{ContentRef, Domain, ZERO_REF};
        use super::journal::{Stored, ZERO_CONTENT};
        use super::pool::{NewPage, Pool, PoolLog, DEDUP_BIT};
        use super::recover::recover_domain;
        use super::{
            ClientConfig, CLIENT_PAGE_COST, CLIENT_SHARDS, CONTENT_METADATA_COST, GROUP_DOMAIN,
            GROUP_SHARDS, PAGE_METADATA_COST, RESERVED_PAGE_CLIENT_COST, RESERVED_PAGE_HOST_COST,
        };
        use parking_lot::RwLock;
        use std::collections::{BTreeMap, HashMap};
        use vtmem_protocol::{Handle, POOL_EXCLUSIVE_GETS, POOL_PERSISTENT};

        let started = std::time::Instant::now();
        let dir = StateDir::open(path)?;
        let seed = read_seed(&dir)?;
        let (arena, chunks) = Arena::open(&dir)?;
        let clients = ClientsFile::open(&dir)?;
        let tags: Vec<_> = chunks.iter().map(|(t, _)| *t).collect();
        let groups = clients.groups().clone();
        // Domains by durable number, with their clients.
        let mut domains: BTreeMap<u32, Vec<(String, u32)>> = BTreeMap::new();
        for (name, c) in clients.clients() {
            let d = u32::try_from(c.domain).map_err(|_| {
                PersistError::Corrupt(
                    clients.path().to_path_buf(),
                    format!("client {name:?}: domain number {} out of range", c.domain),
                )
            })?;
            domains.entry(d).or_default().push((name.clone(), c.client));
        }
        // Files of domains no client names any more.
        if let Ok(entries) = fs::read_dir(dir.path()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let number = name
                    .strip_prefix('d')
                    .and_then(|r| r.split('.').next())
                    .and_then(|n| n.parse::<u32>().ok());
                if let Some(n) = number.filter(|n| !domains.contains_key(n)) {
                    remove_domain_files(&dir, u64::from(n));
                }
            }
        }
        let mut extents: HashMap<u32, Vec<_>> = HashMap::new();
        for (t, e) in chunks {
            if domains.contains_key(&t.domain) {
                extents
                    .entry(t.domain)
                    .or_default()
                    .push((t.shard, t.class, t.chunk, e));
            }
            // Otherwise dropped: unlisted and punched.
        }
        let store = Store::build(
            config,
            seed,
            Some(Persist {
                dir,
                arena,
                clients: Mutex::new(clients),
            }),
        );
        let Some(p) = &store.persist else {
            unreachable!("built with a state");
        };
        let g = &store.g;
        let mut out = Recovered::default();
        for (number, members) in domains {
            let rec = recover_domain(&p.dir, u64::from(number), &tags)?;
            out.skipped_records += rec.skipped;
            let corrupt = |what: String| {
                PersistError::Corrupt(snapshot_path(&p.dir, u64::from(number)), what)
            };
            let mut refs: HashMap<u32, u32> = HashMap::new();
            for pools in rec.state.clients.values() {
                for rp in pools.values() {
                    for &c in rp.pages.values() {
                        if c != ZERO_CONTENT {
                            let n = refs.entry(c).or_default();
                            *n = n.checked_add(1).ok_or_else(|| {
                                corrupt(format!("content entry {c}: too many references"))
                            })?;
                        }
                    }
                }
            }
            let contents: Vec<(ContentRef, Stored, u32)> = rec
                .state
                .contents
                .iter()
                .map(|(&e, &s)| (e, s, refs.get(&e).copied().unwrap_or(0)))
                .collect();
            out.contents += contents.len() as u64;
            let log = Arc::new(DomainLog::start(&p.dir, number, &rec.state)?);
            let shards = if number & GROUP_DOMAIN != 0 {
                GROUP_SHARDS
            } else {
                CLIENT_SHARDS
            };
            let domain = Arc::new(Domain::in_state(
                shards,
                seed,
                g.overhead.clone(),
                &p.arena,
                log.clone(),
            ));
            domain
                .adopt(&contents, extents.remove(&number).unwrap_or_default())
                .map_err(corrupt)?;
            // Each unique content's host charge, once.
            for (_, s, _) in &contents {
                let slot = match s {
                    Stored::Slot { len, .. } => super::alloc::slot_bytes(usize::from(*len)) as u64,
                    Stored::Pattern(_) => 0,
                };
                account::charge(&g.host_used, slot + CONTENT_METADATA_COST);
            }
            let group = groups.get(&u64::from(number)).cloned();
            if let Some(g) = &group {
                store
                    .groups
                    .lock()
                    .insert(g.clone(), Arc::downgrade(&domain));
            }
            let stored: HashMap<u32, Stored> = rec.state.contents.clone();
            let mut first_ref: std::collections::HashSet<u32> = Default::default();
            for (name, number_c) in members {
                let cfg = ClientConfig::default();
                let acct = Arc::new(Acct::new(
                    u64::from(number_c),
                    cfg.persistent_quota,
                    cfg.ephemeral_quota,
                    cfg.weight,
                ));
                let client = Arc::new(Client {
                    name: name.clone(),
                    acct: acct.clone(),
                    table: RwLock::new(Table {
                        removed: false,
                        pools: Default::default(),
                        domain: domain.clone(),
                    }),
                    meta: Mutex::new(Meta {
                        dedup_group: group.clone(),
                        authorized: Vec::new(),
                    }),
                    pending: Mutex::new(
                        rec.state
                            .pending
                            .get(&number_c)
                            .cloned()
                            .unwrap_or_default(),
                    ),
                });
                store.clients.write().insert(name.clone(), client.clone());
                store.accts.write().push(acct.clone());
                out.clients += 1;
                let Some(pools) = rec.state.clients.get(&number_c) else {
                    continue;
                };
                let mut table = client.table.write();
                for (&id, rp) in pools {
                    out.pools += 1;
                    let persistent = rp.flags & POOL_PERSISTENT != 0;
                    let pool = match rp.uuid {
                        Some(uuid) => store.join_shared(uuid, &acct),
                        None => {
                            let exclusive = !persistent || rp.flags & POOL_EXCLUSIVE_GETS != 0;
                            let pool = Arc::new(Pool::new(
                                persistent,
                                exclusive,
                                None,
                                domain.clone(),
                                acct.clone(),
                                store.hasher,
                                Some(PoolLog {
                                    log: log.clone(),
                                    client: number_c,
                                    pool: id,
                                }),
                            ));
                            if !persistent {
                                store.evictable.add(&acct, &pool);
                            }
                            pool
                        }
                    };
                    if persistent {
                        let mut idx = pool.lock();
                        for (&(object, index), &c) in &rp.pages {
                            let (value, data, pattern) = if c == ZERO_CONTENT {
                                (ZERO_REF, 0, false)
                            } else {
                                let dedup = if first_ref.insert(c) { 0 } else { DEDUP_BIT };
                                match stored.get(&c) {
                                    Some(Stored::Slot { len, .. }) => (
                                        c | dedup,
                                        super::alloc::slot_bytes(usize::from(*len)) as u64,
                                        false,
                                    ),
                                    Some(Stored::Pattern(_)) => (c | dedup, 0, true),
                                    None => {
                                        return Err(corrupt(format!(
                                            "a page of unknown content entry {c}"
                                        )))
                                    }
                                }
                            };
                            let client_cost = data + CLIENT_PAGE_COST;
                            account::charge(&acct.pers_charged, client_cost);
                            account::charge(&g.host_used, PAGE_METADATA_COST);
                            let h = Handle {
                                pool: u32::from(id),
                                object,
                                index,
                            };
                            let new = NewPage {
                                value,
                                client_cost,
                                pattern,
                                reserved: false,
                                log: false,
                            };
                            if pool
                                .store_locked(&mut idx, &h.object, h.index, new, &acct, g)
                                .is_err()
                            {
                                return Err(corrupt(format!(
                                    "pool {id} of client {number_c}: its index is full"
                                )));
                            }
                            out.pages += 1;
                        }
                        pool.reserved
                            .store(rp.reserved, std::sync::atomic::Ordering::Release);
                        account::charge(
                            &acct.pers_charged,
                            rp.reserved.saturating_mul(RESERVED_PAGE_CLIENT_COST),
                        );
                        account::charge(
                            &g.host_used,
                            rp.reserved.saturating_mul(RESERVED_PAGE_HOST_COST),
                        );
                        pool.settle(&mut idx, g);
                    }
                    let slot = table.pools.get_mut(usize::from(id)).ok_or_else(|| {
                        corrupt(format!("pool id {id} of client {number_c} out of range"))
                    })?;
                    *slot = Some(pool);
                }
            }
        }
        // Recovered: chunks it dropped go back to the host now, not
        // before (a recovery that failed must leave the state as it was).
        p.arena.recovered();
        out.elapsed = started.elapsed();
        Ok((store, out))
    }
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

    #[test]
    fn a_store_is_recovered_from_its_state() {
        let top = tempfile::tempdir().unwrap();
        let p = top.path().join("state");
        let cfg = || StoreConfig {
            host_limit: 64 << 20,
        };
        let store = Store::create(&p, cfg()).unwrap();
        let c = store
            .add_client("a", ClientConfig::default())
            .unwrap()
            .data();
        assert_eq!(c.new_pool(PoolSpec::ephemeral()).unwrap(), 0);
        assert_eq!(c.new_pool(PoolSpec::persistent()).unwrap(), 1);
        let h = |index| Handle {
            pool: 1,
            object: ObjectId([9, 0, 0]),
            index,
        };
        let page = |i: u64| {
            let mut p = [0u8; PAGE_SIZE];
            p[..8].copy_from_slice(&i.to_le_bytes());
            p[4000] = 1;
            p
        };
        for i in 0..50 {
            c.put(&h(i), &page(i % 20), false).unwrap();
        }
        assert_eq!(c.reserve(1, 3).unwrap(), 3);
        let before = store.stats();
        drop(c);
        drop(store);
        let (store, rec) = Store::recover(&p, cfg()).unwrap();
        assert_eq!(
            (rec.clients, rec.pools, rec.pages, rec.contents),
            (1, 2, 50, 20)
        );
        let c = store.client("a").unwrap().data();
        let mut out = [0u8; PAGE_SIZE];
        for i in 0..50 {
            assert!(c.get(&h(i), &mut out).unwrap());
            assert!(out == page(i % 20));
        }
        let after = store.stats();
        assert_eq!(after.host_used, before.host_used);
        assert_eq!(after.unique_pages, 20);
        assert_eq!(after.reserved_pages, 3);
        assert_eq!(store.recount_overhead(), after.host_overhead);
        // Another store may not open it while this one holds it.
        assert!(Store::recover(&p, cfg()).is_err());
    }

    #[test]
    fn a_journal_past_its_bound_is_checkpointed() {
        let top = tempfile::tempdir().unwrap();
        let p = top.path().join("state");
        let cfg = || StoreConfig {
            host_limit: 64 << 20,
        };
        let store = Store::create(&p, cfg()).unwrap();
        let c = store
            .add_client("a", ClientConfig::default())
            .unwrap()
            .data();
        assert_eq!(c.new_pool(PoolSpec::persistent()).unwrap(), 0);
        let log = store.clients.read()["a"]
            .table
            .read()
            .domain
            .log
            .clone()
            .unwrap();
        log.bound.store(8, std::sync::atomic::Ordering::Relaxed);
        let journals = || {
            std::fs::read_dir(&p)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("d1.journal."))
                .map(|e| e.path())
                .collect::<Vec<_>>()
        };
        let first = journals();
        let h = |index| Handle {
            pool: 0,
            object: ObjectId([1, 0, 0]),
            index,
        };
        let page = |i: u64| {
            let mut p = [3u8; PAGE_SIZE];
            p[..8].copy_from_slice(&i.to_le_bytes());
            p
        };
        for i in 0..40 {
            c.put(&h(i), &page(i), false).unwrap();
            log.bound.store(8, std::sync::atomic::Ordering::Relaxed);
        }
        c.flush_page(&h(3)).unwrap();
        let now = journals();
        assert_eq!(now.len(), 1, "the old journals are deleted");
        assert_ne!(now, first, "a checkpoint started a new journal");
        drop((c, log));
        drop(store);
        let (store, rec) = Store::recover(&p, cfg()).unwrap();
        assert_eq!(rec.pages, 39);
        let c = store.client("a").unwrap().data();
        let mut out = [0u8; PAGE_SIZE];
        for i in 0..40 {
            assert_eq!(c.get(&h(i), &mut out).unwrap(), i != 3);
            if i != 3 {
                assert!(out == page(i));
            }
        }
    }

    #[test]
    fn open_creates_or_recovers() {
        let top = tempfile::tempdir().unwrap();
        let p = top.path().join("state");
        let cfg = || StoreConfig {
            host_limit: 64 << 20,
        };
        let (store, rec) = Store::open(&p, cfg()).unwrap();
        assert!(rec.is_none());
        let c = store
            .add_client("a", ClientConfig::default())
            .unwrap()
            .data();
        let pool = c.new_pool(PoolSpec::persistent()).unwrap();
        let h = Handle {
            pool,
            object: ObjectId([1, 1, 1]),
            index: 5,
        };
        c.put(&h, &[9u8; PAGE_SIZE], false).unwrap();
        drop((c, store));
        let (store, rec) = Store::open(&p, cfg()).unwrap();
        assert_eq!(rec.unwrap().pages, 1);
        let mut out = [0u8; PAGE_SIZE];
        assert!(store.client("a").unwrap().data().get(&h, &mut out).unwrap());
        // Something else in the directory is refused, not overwritten.
        drop(store);
        std::fs::write(top.path().join("other"), b"x").unwrap();
        let e = Store::open(top.path(), cfg()).unwrap_err().to_string();
        assert!(e.contains("not a vtmem state directory"), "{e}");
    }

    /// A crash in the middle of the first `Store::create` leaves a
    /// directory the next `Store::open` creates again; a state that was
    /// created is never taken for one.
    #[test]
    fn an_interrupted_creation_is_created_again() {
        let cfg = || StoreConfig {
            host_limit: 64 << 20,
        };
        let top = tempfile::tempdir().unwrap();
        let whole = top.path().join("whole");
        drop(Store::create(&whole, cfg()).unwrap());
        let mut files: Vec<String> = std::fs::read_dir(&whole)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            ["arena", "chunks", "clients", "format", "lock", "seed"]
        );
        // What each step of a creation leaves, in the order it writes.
        let steps: [&[&str]; 6] = [
            &["lock"],
            &["lock", "creating"],
            &["lock", "creating", "format"],
            &["lock", "creating", "format", "arena", "chunks"],
            &["lock", "creating", "format", "arena", "chunks", "seed"],
            &[
                "lock", "creating", "format", "arena", "chunks", "seed", "clients",
            ],
        ];
        for (i, step) in steps.iter().enumerate() {
            let p = top.path().join(format!("step{i}"));
            std::fs::create_dir(&p).unwrap();
            for f in *step {
                let from = whole.join(f);
                if from.exists() {
                    std::fs::copy(&from, p.join(f)).unwrap();
                } else {
                    std::fs::write(p.join(f), b"").unwrap();
                }
            }
            let (store, rec) = Store::open(&p, cfg()).unwrap_or_else(|e| panic!("step {i}: {e}"));
            assert!(rec.is_none(), "step {i}: recovered");
            let c = store
                .add_client("a", ClientConfig::default())
                .unwrap()
                .data();
            let pool = c.new_pool(PoolSpec::persistent()).unwrap();
            let h = Handle {
                pool,
                object: ObjectId([1, 1, 1]),
                index: 5,
            };
            c.put(&h, &[7u8; PAGE_SIZE], false).unwrap();
            drop((c, store));
            // Created whole this time: it recovers.
            let (store, rec) = Store::open(&p, cfg()).unwrap();
            assert_eq!(rec.unwrap().pages, 1, "step {i}");
            drop(store);
        }
        // A created state holding pages is never cleared, whatever else
        // is missing from it.
        let p = top.path().join("step5");
        std::fs::remove_file(p.join("seed")).unwrap();
        assert!(Store::open(&p, cfg()).is_err());
        assert!(p.join("arena").exists() && p.join("clients").exists());
    }

    /// Puts learn that the journal has room from `is_tight` alone while
    /// it is false: it must turn true before `has_room` turns false.
    #[test]
    fn the_journal_is_tight_before_it_lacks_room() {
        use super::{DomainLog, JOURNAL_RECORDS};
        use crate::journal::{Record, Replayed};
        use std::sync::atomic::Ordering;

        let top = tempfile::tempdir().unwrap();
        let dir = StateDir::create(&top.path().join("state")).unwrap();
        let log = DomainLog::start(&dir, 0, &Replayed::default()).unwrap();
        assert!(!log.is_tight() && log.has_room());
        // A margin that leaves room for 100 more records.
        let margin = (JOURNAL_RECORDS - 100) / 2;
        log.margin.store(margin, Ordering::Relaxed);
        let record = Record::FlushObject {
            client: 0,
            pool: 0,
            object: ObjectId([1, 2, 3]),
        };
        let mut tight_at = None;
        for n in 0..JOURNAL_RECORDS {
            if !log.is_tight() {
                assert!(log.has_room(), "no room after {n} records, not tight");
            } else if tight_at.is_none() {
                tight_at = Some(n);
            }
            if !log.has_room() {
                break;
            }
            log.append(&record);
        }
        let tight_at = tight_at.expect("the journal never turned tight");
        // Within twice the margin of the end (the header takes a place).
        assert!(
            tight_at <= JOURNAL_RECORDS - 2 * margin + 1,
            "tight at {tight_at}"
        );
        // A new journal is not tight, unless its margin leaves it none.
        log.margin.store(JOURNAL_RECORDS / 2 + 1, Ordering::Relaxed);
        log.restart(&dir, &Replayed::default()).unwrap();
        assert!(
            log.is_tight(),
            "a margin of half the journal leaves it tight"
        );
        log.margin.store(16, Ordering::Relaxed);
        log.restart(&dir, &Replayed::default()).unwrap();
        assert!(!log.is_tight() && log.has_room());
    }
}
