// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The tmem store: clients, pools and pages, with compression,
//! deduplication, quotas and eviction. It takes byte slices and handles and
//! knows nothing of virtio or guest memory.
//!
//! # Model
//!
//! A [`Store`] holds clients (one per VM, by name). A client opens up to
//! `MAX_POOLS_PER_CLIENT` (16) pools, each ephemeral (pages may be dropped
//! at any time) or persistent (kept until flushed), private or shared.
//! Semantics follow Xen tmem, cleancache and frontswap:
//!
//! * A put replaces what the handle held. A put that fails drops the old
//!   copy: after any put, the old data is never readable.
//! * Gets of private ephemeral pools are exclusive (a hit removes the page);
//!   persistent gets keep the page unless the pool asked for exclusive gets;
//!   shared-pool gets keep the page.
//! * A miss is final: nothing brings a page back but a new put.
//! * Shared pools are ephemeral only and joined by UUID, only if the admin
//!   authorised that UUID for the client ([`AdminHandle::authorize`];
//!   de-authorising does not expel a member that already joined). A shared
//!   pool lives while any member has it open. Each page is charged to the
//!   member that wrote it (its ephemeral quota, its weighted share; its
//!   own pages are what eviction on its behalf takes), never to the others.
//!   The pool's owner (the client that created it, then the member that
//!   joined earliest) is charged for its index. When a member leaves, the
//!   pages it wrote stay for the others, charged to the owner from then on;
//!   if that pushes the owner over its ephemeral quota its oldest pages are
//!   evicted. A shared pool has its own dedup domain, so members cannot
//!   probe each other's private contents through it.
//!
//! The guest serialises operations on one handle, but nothing here relies
//! on it: concurrent puts, gets and flushes of one handle leave either
//! value or none, never a mix, and never leak a charge.
//!
//! # Data structures
//!
//! * Per pool, one mutex over the handle index (module `pool`): interned objects,
//!   blocks of 16 content references found by `(object, index / 16)`, and
//!   for ephemeral pools a FIFO/CLOCK queue of 8-byte entries.
//! * Per dedup domain, shards chosen by content hash, each with its own
//!   mutex, content table, dedup index and slab allocator (modules `content`,
//!   `alloc`). A client's domain is its own, or shared by every client of
//!   its `dedup_group`: cross-VM dedup lets one guest time whether another
//!   holds a page (the side channel Xen removed dedup over), so it happens
//!   only between clients the admin put in one group.
//! * Accounting is atomic (module `account`); there is no store-wide lock on the
//!   data path. A client's pool table is a read-write lock taken for reading
//!   by its own data-path calls and for writing only by pool creation and
//!   destruction and admin changes.
//! * Lock order: client pool table, then the shared-pool registry, then one
//!   pool, then one content shard. No path holds two pool locks, two shards
//!   or two clients' tables. Eviction runs with no pool lock held.
//!
//! # Storing a page
//!
//! Zero pages store nothing but a marker; same-filled pages (all 64-bit
//! words equal) become a data-less pattern entry. Other pages are hashed
//! (xxh3-128, keyed per store) and looked up in the domain; a hash match is
//! confirmed by a full comparison before it is shared. New content is
//! compressed with LZ4 into a fixed buffer and stored raw if the result
//! exceeds 7/8 of a page ([`RAW_THRESHOLD`], zcache2's threshold), in a
//! 64-byte size class of a slab allocator (64 KiB chunks, `u32` slot
//! addresses, free slots reused, empty chunks released).
//!
//! # Charging
//!
//! Every stored page is charged to its client (the pool's owner, or in a
//! shared pool the member that wrote it) as
//! `stored size + CLIENT_PAGE_COST` bytes, where the stored size is the
//! content's allocator slot (a multiple of 64 bytes; a whole page when
//! stored raw; 0 for zero and same-filled pages) and
//! [`CLIENT_PAGE_COST`] (64 bytes) is a fixed per-page metadata cost. The
//! charge is the same whether or not the content is shared with other pages:
//! a client's usage, and so whether its puts succeed, never depends on what
//! other clients store, which would be a side channel through quotas.
//! Persistent pages count against the persistent quota, ephemeral pages
//! against the ephemeral quota.
//!
//! The host limit counts real memory: each unique content once (its slot
//! plus [`CONTENT_METADATA_COST`]), each page's [`PAGE_METADATA_COST`],
//! every outstanding reservation at its worst case, and the *overhead*:
//! what each content shard and pool index really holds beyond those
//! charges (allocator holes, sparse index blocks, one page per object,
//! tables between resizes), reported by each structure after every change
//! (`host_overhead` in [`StoreStats`]). A pool's index overhead is charged
//! to its owner as well. A put finds room for the tables it would grow
//! before it starts. The slab compacts a size class once its holes reach
//! two chunks, and after evictions at one, so no flush pattern strands
//! memory; what no charge counts is at most [`FIXED_OVERHEAD_PER_CLIENT`]
//! per client.
//!
//! Charges are taken with compare-and-swap against the limit before the
//! page is stored, so neither quotas nor the host limit are ever exceeded,
//! however many puts race (lowering a limit below current use is the only
//! way to be above it).
//!
//! # Limits and eviction
//!
//! * Persistent put over the persistent quota: refused (`OverQuota`).
//!   Lowering the persistent quota below use refuses new puts and never
//!   drops pages.
//! * Ephemeral put over the ephemeral quota: the client's own oldest
//!   ephemeral pages are evicted to make room; lowering the quota evicts at
//!   once.
//! * Any put over the host limit evicts ephemeral pages by weighted LRU (see
//!   module `evict`): the client with the largest `ephemeral bytes / weight` loses
//!   its own oldest pages first. If nothing evictable is left, the put is
//!   refused (`NoSpace`). Lowering the host limit evicts at once. Persistent
//!   pages are never evicted.
//!
//! # Reservations
//!
//! [`DataHandle::reserve`] grants up to `n` pages of a persistent pool,
//! charging each at its worst case ([`RESERVED_PAGE_CLIENT_COST`] against
//! the persistent quota, [`RESERVED_PAGE_HOST_COST`] against the host
//! limit) up front, evicting ephemeral pages if needed. A put with
//! `reserved = true` spends one page of the reservation and swaps the
//! worst-case charge for the real one (always smaller), so it can never be
//! refused for space, quota or freeze. Unreserve, destroying the pool,
//! reset and client removal give unspent reservations back.
//!
//! # Metadata
//!
//! `StoreStats::metadata_bytes` adds up the real capacities of every table
//! (hash maps by their bucket arrays, vectors by their capacity). In a dense
//! object a page costs about 6 to 11 bytes of index (its 4-byte slot in an
//! 88-byte block of 16, plus a share of the block map), an ephemeral page 8
//! to 16 bytes of queue, and each unique content a 28-byte entry plus 5 to
//! 11 bytes of dedup index. The `store` benchmark measures about 45 bytes
//! per page for persistent pools and 54 for ephemeral ones (16384
//! compressible pages; zero and duplicate pages about 10).
//!
//! The per-page metadata cost charged ([`PAGE_METADATA_COST`] +
//! [`CONTENT_METADATA_COST`]) is a flat figure for that dense case. A guest
//! that scatters single pages over many objects or far-apart indexes uses
//! up to about 190 bytes of metadata per page (a block, a block-map entry
//! and an object entry each), more than it is charged; quotas still bound
//! it, since every page is charged at least [`CLIENT_PAGE_COST`].

mod account;
mod alloc;
mod api;
mod client;
pub mod clients;
mod content;
mod evict;
mod evictable;
mod image;
pub mod journal;
mod persist;
mod pool;
pub mod recover;
pub mod snapshot;
pub mod state;

use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

pub use vtmem_protocol::{Handle, ObjectId, PoolSpec, Uuid, PAGE_SIZE};

pub use account::{
    OpCounters, CLIENT_PAGE_COST, CONTENT_METADATA_COST, PAGE_METADATA_COST,
    RESERVED_PAGE_CLIENT_COST, RESERVED_PAGE_HOST_COST,
};
pub use alloc::{CHUNK_BYTES, CLASS_STEP};
pub use api::{ClientConfig, ClientStats, PoolStats, StoreConfig, StoreStats, TmemError};
pub use client::{AdminHandle, DataHandle, OnceAnswer, OnceOp, Taken, MAX_RESERVE_PAGES};
pub use content::RAW_THRESHOLD;
pub use evict::EVICT_BATCH;
pub use image::{ImageError, ImageSummary, IMAGE_MAGIC, IMAGE_VERSION, MAX_FRAME};
pub use journal::OpRef;
pub use persist::{PersistError, Recovered};

use account::{Acct, Global};
use client::{log_client, Client, Meta, Table};
use content::Domain;
use evictable::EvictableLists;
use journal::Record;
use persist::{DomainLog, Persist};
use pool::{KeyedState, Pool};

/// One page of data.
pub type Page = [u8; PAGE_SIZE];

/// Most bytes of real memory a client's structures hold that no charge
/// counts: the base cost of each pool a client may open
/// ([`pool::POOL_BASE_COST`]) and of each shard of its own dedup domain
/// ([`content::SHARD_BASE_COST`]), plus the fixed-size structures
/// themselves. Everything beyond it (allocator holes, sparse indexes,
/// table slack) is charged as overhead against the host limit, so the
/// store's real memory stays within `host limit + clients ×` this.
pub const FIXED_OVERHEAD_PER_CLIENT: u64 = vtmem_protocol::MAX_POOLS_PER_CLIENT as u64
    * pool::POOL_BASE_COST
    + CLIENT_SHARDS as u64 * content::SHARD_BASE_COST
    + 32 * 1024;

/// Shards of a client's own dedup domain. Each shard has its own slab
/// allocator, whose partly filled chunks (up to one per size class) are
/// slack: more shards mean less contention between one client's threads
/// but more slack per client.
const CLIENT_SHARDS: usize = 2;
/// Shards of a dedup group's domain (many clients put into it).
const GROUP_SHARDS: usize = 8;
/// The bit of a durable domain number that marks a dedup group's domain
/// (of [`GROUP_SHARDS`] shards; the others have [`CLIENT_SHARDS`]).
const GROUP_DOMAIN: u32 = 1 << 31;
/// Shards of a shared pool's domain.
const SHARED_POOL_SHARDS: usize = 2;

/// The store. `Send + Sync`; share it as `Arc<Store>`.
#[derive(Debug)]
pub struct Store {
    /// This store, for handles created from `&self`.
    me: Weak<Store>,
    g: Global,
    clients: RwLock<BTreeMap<String, Arc<Client>>>,
    /// Accounts of the live clients, scanned to pick eviction victims.
    accts: RwLock<Vec<Arc<Acct>>>,
    /// Each client's ephemeral pools, for eviction.
    evictable: EvictableLists,
    /// Live shared pools by UUID.
    shared: Mutex<HashMap<Uuid, Arc<Pool>>>,
    /// Dedup groups' domains.
    groups: Mutex<HashMap<String, Weak<Domain>>>,
    /// Counters of removed clients.
    retired: Mutex<OpCounters>,
    next_client: AtomicU64,
    seed: u64,
    hasher: KeyedState,
    /// The crash-safe state, if the store has one.
    persist: Option<Persist>,
}

/// Extents of a new arena for a host limit of `host_limit` bytes: twice
/// the limit's worth of 64 KiB chunks (the file is sparse; the slack
/// covers partly filled chunks), at least 64 MiB and at most 64 GiB.
fn arena_extents(host_limit: u64) -> u32 {
    let want = (host_limit / state::EXTENT_BYTES as u64).saturating_mul(2);
    want.clamp(1024, 1 << 20) as u32
}

/// The sum of the clients' weights (at least 1).
fn total_weight(accts: &[Arc<Acct>]) -> u64 {
    accts
        .iter()
        .map(|a| u64::from(a.weight.load(Ordering::Relaxed).max(1)))
        .sum::<u64>()
        .max(1)
}

/// `limit × weight / total`, without overflow.
fn share_of(limit: u64, acct: &Acct, total_weight: u64) -> u64 {
    let w = u128::from(acct.weight.load(Ordering::Relaxed).max(1));
    u64::try_from(u128::from(limit) * w / u128::from(total_weight)).unwrap_or(u64::MAX)
}

impl Store {
    /// Creates an empty store.
    pub fn new(config: StoreConfig) -> Arc<Store> {
        let rs = std::collections::hash_map::RandomState::new();
        let seed = rs.hash_one(0x766d_746d_u64);
        Store::build(config, seed, None)
    }

    /// Creates an empty store whose persistent pages and metadata live in
    /// the new state directory `path` (docs/ARCHITECTURE.md, "Crash-safe
    /// state"): a new directory, or an empty one. Its arena is a sparse
    /// file of twice the host limit, at least 64 MiB and at most 64 GiB
    /// (larger arenas are still to do: the chunk directory is read whole
    /// at recovery).
    pub fn create(path: &std::path::Path, config: StoreConfig) -> Result<Arc<Store>, PersistError> {
        let dir = state::StateDir::create(path)?;
        let arena = state::Arena::create(&dir, arena_extents(config.host_limit))?;
        let seed = persist::random_u64();
        persist::write_seed(&dir, seed)?;
        let clients = clients::ClientsFile::open(&dir)?;
        dir.created()?;
        Ok(Store::build(
            config,
            seed,
            Some(Persist {
                dir,
                arena,
                clients: Mutex::new(clients),
            }),
        ))
    }

    /// The store of the state directory `path`: recovered if it holds a
    /// state (see [`Store::recover`]), created if it does not exist, is
    /// empty, or holds only what a creation that did not finish left (see
    /// [`Store::create`]). The summary is that of the
    /// recovery, if there was one.
    pub fn open(
        path: &std::path::Path,
        config: StoreConfig,
    ) -> Result<(Arc<Store>, Option<Recovered>), PersistError> {
        let empty = match std::fs::read_dir(path) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(state::StateError::Io(path.to_path_buf(), e).into()),
        };
        if empty {
            Ok((Store::create(path, config)?, None))
        } else if state::StateDir::clear_interrupted_creation(path)? {
            log::warn!(
                "state directory {}: its creation was interrupted (nothing was stored in it): created again",
                path.display()
            );
            Ok((Store::create(path, config)?, None))
        } else {
            let (store, rec) = Store::recover(path, config)?;
            Ok((store, Some(rec)))
        }
    }

    /// The state directory, if the store has one.
    pub fn state_dir(&self) -> Option<&std::path::Path> {
        self.persist.as_ref().map(|p| p.dir.path())
    }

    fn build(config: StoreConfig, seed: u64, persist: Option<Persist>) -> Arc<Store> {
        let rs = std::collections::hash_map::RandomState::new();
        let hseed = rs.hash_one(seed);
        Arc::new_cyclic(|me| Store {
            me: me.clone(),
            g: Global::new(config.host_limit),
            clients: RwLock::new(BTreeMap::new()),
            accts: RwLock::new(Vec::new()),
            evictable: EvictableLists::default(),
            shared: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            retired: Mutex::new(OpCounters::default()),
            next_client: AtomicU64::new(1),
            seed,
            hasher: KeyedState::new(hseed),
            persist,
        })
    }

    /// Adds a client.
    pub fn add_client(
        self: &Arc<Self>,
        name: &str,
        config: ClientConfig,
    ) -> Result<AdminHandle, TmemError> {
        if name.is_empty() {
            return Err(TmemError::Invalid("empty client name"));
        }
        if config.weight == 0 {
            return Err(TmemError::Invalid("weight must be at least 1"));
        }
        let mut clients = self.clients.write();
        if clients.contains_key(name) {
            return Err(TmemError::ClientExists(name.to_string()));
        }
        let (id, domain) = match &self.persist {
            None => {
                let id = self.next_client.fetch_add(1, Ordering::Relaxed);
                (id, self.domain_for(config.dedup_group.as_deref(), 0)?)
            }
            Some(p) => {
                let mut file = p.clients.lock();
                let number = file.next_number();
                let domain = self.domain_for(config.dedup_group.as_deref(), number)?;
                let number = domain.log.as_ref().map_or(0, |l| l.number);
                if let Some(group) = &config.dedup_group {
                    file.name_group(u64::from(number), group).map_err(|e| {
                        log::error!("client {name:?}: {e}");
                        TmemError::Busy("the state directory could not be written")
                    })?;
                }
                let c = file.add(name, u64::from(number)).map_err(|e| {
                    log::error!("client {name:?}: {e}");
                    TmemError::Busy("the state directory could not be written")
                })?;
                (u64::from(c.client), domain)
            }
        };
        let acct = Arc::new(Acct::new(
            id,
            config.persistent_quota,
            config.ephemeral_quota,
            config.weight,
        ));
        let mut authorized = config.authorized_uuids;
        authorized.sort_unstable();
        authorized.dedup();
        let client = Arc::new(Client {
            name: name.to_string(),
            acct: acct.clone(),
            table: RwLock::new(Table {
                removed: false,
                pools: Default::default(),
                domain,
            }),
            meta: Mutex::new(Meta {
                dedup_group: config.dedup_group,
                authorized,
            }),
            pending: Mutex::new(Default::default()),
        });
        clients.insert(name.to_string(), client.clone());
        self.accts.write().push(acct);
        drop(clients);
        Ok(AdminHandle::new(self.clone(), client))
    }

    /// A handle of the client named `name`.
    pub fn client(&self, name: &str) -> Option<AdminHandle> {
        let c = self.clients.read().get(name).cloned()?;
        Some(AdminHandle::new(self.me.upgrade()?, c))
    }

    /// Frees everything the client holds; later calls on its handles return
    /// `ClientGone`.
    pub fn remove_client(&self, name: &str) -> Result<(), TmemError> {
        let client = self
            .clients
            .write()
            .remove(name)
            .ok_or_else(|| TmemError::UnknownClient(name.to_string()))?;
        self.accts.write().retain(|a| !Arc::ptr_eq(a, &client.acct));
        let mut table = client.table.write();
        table.removed = true;
        log_client(&table, &client.acct, |client| Record::Reset {
            client,
            op: None,
        });
        // As a reset does (and replay of its record): no entry may answer
        // for a client that is gone.
        client.pending.lock().clear();
        for slot in table.pools.iter_mut() {
            if let Some(pool) = slot.take() {
                self.leave_pool(&pool, &client.acct);
            }
        }
        if let Some(p) = &self.persist {
            if let Err(e) = p.clients.lock().remove(name) {
                log::error!("client {name:?}: {e}");
            }
            // A private domain goes with its client (a group's stays; its
            // files are deleted by the next recovery once no client
            // names it).
            if client.meta.lock().dedup_group.is_none() {
                if let Some(l) = &table.domain.log {
                    persist::remove_domain_files(&p.dir, u64::from(l.number));
                }
            }
        }
        drop(table);
        self.retired
            .lock()
            .accumulate(&client.acct.counters.snapshot());
        debug_assert_eq!(client.acct.eph_charged.load(Ordering::Relaxed), 0);
        debug_assert_eq!(client.acct.pers_charged.load(Ordering::Relaxed), 0);
        Ok(())
    }

    /// Names of all clients, sorted.
    pub fn client_names(&self) -> Vec<String> {
        self.clients.read().keys().cloned().collect()
    }

    /// Sets the host limit; lowering it evicts ephemeral pages at once.
    pub fn set_host_limit(&self, bytes: u64) {
        self.g.host_limit.store(bytes, Ordering::Release);
        self.enforce_host_limit();
    }

    /// The host limit in bytes.
    pub fn host_limit(&self) -> u64 {
        self.g.limit()
    }

    /// Bytes charged against the host limit.
    pub fn host_used(&self) -> u64 {
        self.g.used()
    }

    /// Bytes of structure overhead held against the host limit beside
    /// [`Store::host_used`] (see `host_overhead` in [`StoreStats`]).
    pub fn host_overhead(&self) -> u64 {
        self.g.overhead.get()
    }

    /// A client's weighted share of the host: `limit × weight / total
    /// weight` of the live clients.
    pub(crate) fn weighted_share(&self, acct: &Acct) -> u64 {
        let total = total_weight(&self.accts.read());
        share_of(self.g.limit(), acct, total)
    }

    /// A new dedup domain of `shards` shards; with a crash-safe state, its
    /// journal and snapshot are created as domain `number`.
    fn new_domain(&self, shards: usize, number: u32) -> Result<Arc<Domain>, TmemError> {
        let Some(p) = &self.persist else {
            return Ok(Arc::new(Domain::new(
                shards,
                self.seed,
                self.g.overhead.clone(),
            )));
        };
        let log = DomainLog::start(&p.dir, number, &journal::Replayed::default()).map_err(|e| {
            log::error!("domain {number}: {e}");
            TmemError::Busy("the state directory could not be written")
        })?;
        Ok(Arc::new(Domain::in_state(
            shards,
            self.seed,
            self.g.overhead.clone(),
            &p.arena,
            Arc::new(log),
        )))
    }

    /// The dedup domain for a client in `group` (or a private one); a new
    /// one is domain `number` of a crash-safe state.
    fn domain_for(&self, group: Option<&str>, number: u32) -> Result<Arc<Domain>, TmemError> {
        let Some(group) = group else {
            return self.new_domain(CLIENT_SHARDS, number);
        };
        let mut groups = self.groups.lock();
        if let Some(d) = groups.get(group).and_then(Weak::upgrade) {
            return Ok(d);
        }
        groups.retain(|_, w| w.strong_count() > 0);
        let d = self.new_domain(GROUP_SHARDS, number | GROUP_DOMAIN)?;
        groups.insert(group.to_string(), Arc::downgrade(&d));
        Ok(d)
    }

    /// Joins (or creates) the shared pool `uuid` for `acct`.
    fn join_shared(&self, uuid: Uuid, acct: &Arc<Acct>) -> Arc<Pool> {
        let mut shared = self.shared.lock();
        if let Some(pool) = shared.get(&uuid) {
            let mut idx = pool.lock();
            debug_assert!(!idx.destroyed);
            idx.members.push(acct.clone());
            drop(idx);
            // What it writes there is charged to it, and evictable for it.
            self.evictable.add(acct, pool);
            return pool.clone();
        }
        let domain = Arc::new(Domain::new(
            SHARED_POOL_SHARDS,
            self.seed,
            self.g.overhead.clone(),
        ));
        let pool = Arc::new(Pool::new(
            false,
            false,
            Some(uuid),
            domain,
            acct.clone(),
            self.hasher,
            None,
        ));
        self.evictable.add(acct, &pool);
        shared.insert(uuid, pool.clone());
        pool
    }

    /// `acct` closes `pool` (destroy, reset, removal). A private pool is
    /// destroyed; a shared one loses a member and is destroyed with its
    /// last. The pages a leaving member wrote stay for the others, charged
    /// from then on to the pool's owner (its first remaining member), whose
    /// quota is then enforced.
    fn leave_pool(&self, pool: &Arc<Pool>, acct: &Arc<Acct>) {
        let g = &self.g;
        let Some(uuid) = pool.shared else {
            let mut idx = pool.lock();
            idx.destroyed = true;
            pool.clear_locked(&mut idx, g);
            drop(idx);
            let r = pool.take_reservation();
            account::uncharge(&acct.pers_charged, r * RESERVED_PAGE_CLIENT_COST);
            g.uncharge(r * RESERVED_PAGE_HOST_COST);
            self.evictable.remove(acct, pool);
            return;
        };
        let mut shared = self.shared.lock();
        let mut idx = pool.lock();
        idx.members.retain(|m| !Arc::ptr_eq(m, acct));
        if idx.members.is_empty() {
            if shared.get(&uuid).is_some_and(|p| Arc::ptr_eq(p, pool)) {
                shared.remove(&uuid);
            }
            drop(shared);
            idx.destroyed = true;
            pool.clear_locked(&mut idx, g);
            drop(idx);
            self.evictable.remove(acct, pool);
            return;
        }
        drop(shared);
        let heir = idx.members[0].clone();
        pool.hand_over(&mut idx, acct, &heir);
        if Arc::ptr_eq(&idx.owner, acct) {
            // The index's overhead moves with the ownership.
            let overhead = idx.overhead;
            account::uncharge(&acct.eph_charged, overhead);
            account::charge(&heir.eph_charged, overhead);
            idx.owner = heir.clone();
        }
        drop(idx);
        self.evictable.remove(acct, pool);
        let excess = heir.eph_excess(0);
        if excess > 0 {
            self.evict_own(&heir, excess);
        }
    }

    /// Checkpoints `domain` if its journal is due (see
    /// [`Store::checkpoint_all`]).
    pub(crate) fn checkpoint_if_due(&self, domain: &Arc<Domain>) {
        if domain.log.as_ref().is_some_and(|l| l.is_due()) {
            if let Err(e) = self.checkpoint(domain) {
                log::error!("checkpoint of a dedup domain failed: {e}");
            }
        }
    }

    /// Checkpoints every domain of a store with a state directory now,
    /// due or not: its live metadata becomes its snapshot, and its
    /// journal starts again empty. Stores check after puts and flushes
    /// whether a domain's journal has grown past its bound and checkpoint
    /// it then; this is for tests and an orderly stop.
    #[doc(hidden)]
    pub fn checkpoint_all(&self) -> Result<(), PersistError> {
        let domains: Vec<Arc<Domain>> = {
            let clients = self.clients.read();
            let mut seen = HashSet::new();
            clients
                .values()
                .map(|c| c.table.read().domain.clone())
                .filter(|d| seen.insert(Arc::as_ptr(d)))
                .collect()
        };
        for d in &domains {
            self.checkpoint(d)?;
        }
        Ok(())
    }

    /// Sets the records every journal keeps free before operations that
    /// add to the state are refused (for tests; see `DomainLog::has_room`).
    #[doc(hidden)]
    pub fn set_journal_margin(&self, records: u64) {
        for c in self.clients.read().values() {
            if let Some(l) = &c.table.read().domain.log {
                l.set_margin(records);
            }
        }
    }

    /// Writes `domain`'s snapshot and starts its journal again. Every
    /// lock a record of the domain is appended under is held meanwhile:
    /// the client map (no client comes or goes), each member's pool table
    /// (no pool is created or destroyed), each of its private pools (no
    /// page record), then every shard (no content record); so the live
    /// metadata read is exactly what the journal so far replays to. Each
    /// member's pending table is locked last (no `Settled` record, and an
    /// op record's entry is added under the table's or pool's lock), so
    /// the snapshot carries exactly the entries the journal replays to.
    fn checkpoint(&self, domain: &Arc<Domain>) -> Result<(), PersistError> {
        let (Some(p), Some(log)) = (&self.persist, &domain.log) else {
            return Ok(());
        };
        let Some(_one) = log.checkpointing.try_lock() else {
            return Ok(()); // another thread is at it
        };
        let map = self.clients.read();
        let mut tables = Vec::new();
        let mut members = Vec::new();
        for c in map.values() {
            let t = c.table.read();
            if Arc::ptr_eq(&t.domain, domain) {
                tables.push((c.acct.client_id as u32, t));
                members.push(c);
            }
        }
        let mut state = journal::Replayed::default();
        let mut locked = Vec::new();
        for (client, t) in &tables {
            let pools = state.clients.entry(*client).or_default();
            for (id, pool) in t.pools.iter().enumerate() {
                let Some(pool) = pool else {
                    continue;
                };
                let mut flags = 0;
                if pool.persistent {
                    flags |= vtmem_protocol::POOL_PERSISTENT;
                    if pool.exclusive_gets {
                        flags |= vtmem_protocol::POOL_EXCLUSIVE_GETS;
                    }
                }
                if pool.shared.is_some() {
                    flags |= vtmem_protocol::POOL_SHARED;
                }
                let mut rp = journal::ReplayedPool {
                    flags,
                    uuid: pool.shared,
                    ..Default::default()
                };
                if pool.shared.is_none() {
                    // Shared pools have no page records (and may be open
                    // in two members' tables: locked once, never).
                    let idx = pool.lock();
                    if pool.persistent {
                        rp.reserved = pool.reserved.load(Ordering::Acquire) + idx.pending_reserved;
                        // Gathered first and built in bulk: inserting one
                        // by one into the map took most of a checkpoint.
                        let mut pages = Vec::new();
                        idx.pages.visit(0, usize::MAX, |o, i, v| {
                            pages.push(((*o, i), v & content::ID_MASK));
                        });
                        rp.pages = pages.into_iter().collect();
                        // Taken by exclusive gets whose answers are not out
                        // yet: still there for the journal (rule 5).
                        for (&k, &(_, v)) in &idx.taken {
                            rp.pages.entry(k).or_insert(v & content::ID_MASK);
                        }
                    }
                    locked.push(idx);
                }
                pools.insert(id as u8, rp);
            }
        }
        let mut pending = Vec::new();
        for c in &members {
            let p = c.pending.lock();
            if !p.is_empty() {
                state.pending.insert(c.acct.client_id as u32, p.clone());
            }
            pending.push(p);
        }
        let r = domain.with_logged_contents(|contents| {
            state.contents = contents;
            log.restart(&p.dir, &state)
        });
        drop(pending);
        drop(locked);
        drop(tables);
        drop(map);
        r
    }

    /// The structure overhead computed afresh from every pool and domain.
    /// With no operation in flight it equals `host_overhead` in
    /// [`Store::stats`]; tests check that it does.
    #[doc(hidden)]
    pub fn recount_overhead(&self) -> u64 {
        let clients: Vec<Arc<Client>> = self.clients.read().values().cloned().collect();
        let mut pools_seen: HashSet<*const Pool> = HashSet::new();
        let mut domains: HashMap<u64, Arc<Domain>> = HashMap::new();
        let mut total = 0;
        for c in &clients {
            let (_, pools, domain) = c.stats();
            domains.insert(domain.id(), domain);
            for p in pools {
                if pools_seen.insert(Arc::as_ptr(&p)) {
                    domains.insert(p.domain.id(), p.domain.clone());
                    total += Pool::excess(&p.lock());
                }
            }
        }
        total + domains.values().map(|d| d.recount_overhead()).sum::<u64>()
    }

    /// Statistics of the store and every client.
    pub fn stats(&self) -> StoreStats {
        let clients: Vec<Arc<Client>> = self.clients.read().values().cloned().collect();
        let mut st = StoreStats {
            host_limit: self.g.limit(),
            counters: self.retired.lock().clone(),
            ..Default::default()
        };
        let mut pools_seen: HashSet<*const Pool> = HashSet::new();
        let mut domains: HashMap<u64, Arc<Domain>> = HashMap::new();
        for c in &clients {
            let (cs, pools, domain) = c.stats();
            st.counters.accumulate(&cs.counters);
            st.clients.push(cs);
            domains.insert(domain.id(), domain);
            for p in pools {
                if !pools_seen.insert(Arc::as_ptr(&p)) {
                    continue;
                }
                domains.insert(p.domain.id(), p.domain.clone());
                let idx = p.lock();
                st.pools += 1;
                st.stored_pages += idx.gauges.pages;
                st.zero_pages += idx.gauges.zero;
                st.same_filled_pages += idx.gauges.same;
                st.metadata_bytes += p.metadata_bytes(&idx);
                drop(idx);
                st.reserved_pages += p.reserved.load(Ordering::Relaxed);
            }
        }
        let mut data_entries = 0;
        for d in domains.values() {
            let ds = d.stats();
            data_entries += ds.data_entries;
            st.unique_pages += ds.data_entries + ds.pattern_entries;
            st.raw_pages += ds.raw_entries;
            st.data_bytes += ds.slot_bytes;
            st.allocator_footprint += ds.footprint;
            st.metadata_bytes += ds.metadata_bytes;
        }
        st.dedup_domains = domains.len() as u64;
        st.compression_ratio = if st.data_bytes > 0 {
            (data_entries * PAGE_SIZE as u64) as f64 / st.data_bytes as f64
        } else {
            1.0
        };
        st.dedup_ratio = if st.unique_pages > 0 {
            (st.stored_pages - st.zero_pages) as f64 / st.unique_pages as f64
        } else {
            1.0
        };
        st.fragmentation = if st.allocator_footprint > 0 {
            1.0 - st.data_bytes as f64 / st.allocator_footprint as f64
        } else {
            0.0
        };
        st.metadata_bytes_per_page = if st.stored_pages > 0 {
            st.metadata_bytes as f64 / st.stored_pages as f64
        } else {
            0.0
        };
        // Read last: everything above was charged before it was visible.
        st.host_used = self.g.used();
        st.host_overhead = self.g.overhead.get();
        st
    }
}
