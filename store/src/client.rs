// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Clients and their handles: the data path and the per-client admin calls.

use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vtmem_protocol::{Handle, ObjectId, PoolSpec, Uuid, MAX_POOLS_PER_CLIENT};

use super::account::{
    self, bump, bump_by, Acct, AtomicCounters, CLIENT_PAGE_COST, CONTENT_METADATA_COST,
    PAGE_METADATA_COST, RESERVED_PAGE_CLIENT_COST, RESERVED_PAGE_HOST_COST,
};
use super::content::{classify, compress, Class, Domain, Inserted, NewData, LZ4_BOUND, ZERO_REF};
use super::evict::EVICT_BATCH;
use super::journal::{
    OpRef, Pending, PendingKey, Record, OPCODE_DESTROY_POOL, OPCODE_NEW_POOL, OPCODE_RESERVE,
    OPCODE_RESET, OPCODE_UNRESERVE,
};
use super::persist::Room;
use super::pool::{Got, NewPage, Pool, PoolLog, DEDUP_BIT};
use super::{ClientConfig, ClientStats, Page, PoolStats, Store, TmemError, PAGE_SIZE};

thread_local! {
    /// Compression output buffer of this thread's puts (not zeroed per put).
    static LZ4_BUF: std::cell::RefCell<Box<[u8; LZ4_BOUND]>> =
        std::cell::RefCell::new(Box::new([0u8; LZ4_BOUND]));
}

/// Rounds of eviction a put tries before it is refused.
const MAX_EVICT_ROUNDS: u32 = 8;

/// Most pages one `RESERVE` can be granted (16 MiB of worst-case pages).
/// The guest driver asks for a few hundred at a time.
pub const MAX_RESERVE_PAGES: u64 = 4096;

/// A client's pools, behind its read-write lock.
#[derive(Debug)]
pub(crate) struct Table {
    pub removed: bool,
    pub pools: [Option<Arc<Pool>>; MAX_POOLS_PER_CLIENT as usize],
    /// Where the client's private pools keep content.
    pub domain: Arc<Domain>,
}

impl Table {
    fn pool(&self, id: u32) -> Option<&Arc<Pool>> {
        self.pools.get(id as usize)?.as_ref()
    }
}

/// Admin-only settings.
#[derive(Debug)]
pub(crate) struct Meta {
    pub dedup_group: Option<String>,
    pub authorized: Vec<Uuid>,
}

/// One client (VM).
#[derive(Debug)]
pub(crate) struct Client {
    pub name: String,
    pub acct: Arc<Acct>,
    pub table: RwLock<Table>,
    pub meta: Mutex<Meta>,
    /// The pending table (docs/protocol.md section 8): with a crash-safe
    /// state, the non-idempotent operations of guest requests not known
    /// answered, by request and operation. Entries are added under the
    /// lock their record is written under (the table's, or the pool's for
    /// a reservation), so a checkpoint, which holds those, sees each
    /// entry with its record. Taken after the table and pool locks, never
    /// before; a record is appended while it is held (`Settled`).
    pub pending: Mutex<BTreeMap<PendingKey, Pending>>,
}

/// A non-idempotent operation of a guest request (docs/protocol.md
/// section 8, "Requests offered twice"), for [`DataHandle::run_once`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnceOp {
    NewPool(PoolSpec),
    DestroyPool(u32),
    Reserve { pool: u32, pages: u64 },
    Unreserve { pool: u32, pages: u64 },
    Reset,
}

impl OnceOp {
    fn opcode(&self) -> u8 {
        match self {
            OnceOp::NewPool(_) => OPCODE_NEW_POOL,
            OnceOp::DestroyPool(_) => OPCODE_DESTROY_POOL,
            OnceOp::Reserve { .. } => OPCODE_RESERVE,
            OnceOp::Unreserve { .. } => OPCODE_UNRESERVE,
            OnceOp::Reset => OPCODE_RESET,
        }
    }

    /// What a pending entry must have named to answer it: the `NEW_POOL`
    /// flags; the pool id (none past 255, an id no pool has: then nothing
    /// matches); 0 for `RESET`.
    fn asked(&self) -> Option<u8> {
        match *self {
            OnceOp::NewPool(spec) => Some(spec.flags()),
            OnceOp::DestroyPool(pool)
            | OnceOp::Reserve { pool, .. }
            | OnceOp::Unreserve { pool, .. } => u8::try_from(pool).ok(),
            OnceOp::Reset => Some(0),
        }
    }
}

/// What [`DataHandle::run_once`] answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnceAnswer {
    /// The status value (pool id, pages; 0 for the others), or the error.
    pub result: Result<u64, TmemError>,
    /// Answered from the pending entry of the same request, not executed.
    pub replayed: bool,
}

impl Client {
    fn config(&self) -> ClientConfig {
        let meta = self.meta.lock();
        ClientConfig {
            persistent_quota: self.acct.pers_quota.load(Ordering::Relaxed),
            ephemeral_quota: self.acct.eph_quota.load(Ordering::Relaxed),
            weight: self.acct.weight.load(Ordering::Relaxed),
            dedup_group: meta.dedup_group.clone(),
            authorized_uuids: meta.authorized.clone(),
        }
    }

    /// Statistics, the pools open and the client's domain.
    pub fn stats(&self) -> (ClientStats, Vec<Arc<Pool>>, Arc<Domain>) {
        let (pools, domain) = {
            let t = self.table.read();
            let pools: Vec<(u32, Arc<Pool>)> = t
                .pools
                .iter()
                .enumerate()
                .filter_map(|(i, p)| Some((i as u32, p.clone()?)))
                .collect();
            (pools, t.domain.clone())
        };
        let acct = &self.acct;
        let mut cs = ClientStats {
            name: self.name.clone(),
            config: self.config(),
            frozen: acct.frozen.load(Ordering::Relaxed),
            persistent_charged: acct.pers_charged.load(Ordering::Relaxed),
            counters: acct.counters.snapshot(),
            ..Default::default()
        };
        for (id, p) in &pools {
            let idx = p.lock();
            let owned = Arc::ptr_eq(&idx.owner, acct);
            // A shared pool's pages count for the member that wrote them.
            let mine = match idx.writers.as_ref() {
                Some(w) => w
                    .find(acct)
                    .and_then(|slot| w.writer(slot))
                    .map_or_else(super::pool::Gauges::default, |wr| wr.gauges),
                None => idx.gauges,
            };
            let gz = idx.gauges;
            let index_overhead = idx.overhead;
            drop(idx);
            let reserved = p.reserved.load(Ordering::Relaxed);
            cs.pools.push(PoolStats {
                id: *id,
                persistent: p.persistent,
                shared: p.shared,
                exclusive_gets: p.exclusive_gets,
                pages: gz.pages,
                bytes: gz.bytes,
                reserved_pages: reserved,
                index_overhead,
                owned,
                counters: p.counters.snapshot(),
            });
            cs.reserved_pages += reserved;
            if p.persistent {
                cs.persistent_pages += mine.pages;
                cs.persistent_bytes += mine.bytes;
            } else {
                cs.ephemeral_pages += mine.pages;
                cs.ephemeral_bytes += mine.bytes;
            }
            cs.zero_pages += mine.zero;
            cs.same_filled_pages += mine.same;
            cs.deduplicated_pages += mine.dedup;
        }
        (cs, pools.into_iter().map(|(_, p)| p).collect(), domain)
    }
}

/// A client's data path: pools, puts, gets, flushes, reservations and
/// reset, what a guest may ask for. Cheap to clone, `Send + Sync`.
///
/// It cannot change the client's quotas, weight, freeze state, dedup group
/// or authorisations: those belong to [`AdminHandle`].
#[derive(Clone, Debug)]
pub struct DataHandle {
    pub(crate) store: Arc<Store>,
    pub(crate) client: Arc<Client>,
}

/// A client's administration: quotas, weight, freezing, dedup group,
/// shared-pool authorisations, statistics. What the host administrator
/// (the control socket) holds. Cheap to clone, `Send + Sync`.
#[derive(Clone, Debug)]
pub struct AdminHandle {
    pub(crate) store: Arc<Store>,
    pub(crate) client: Arc<Client>,
}

/// What a stored put was.
pub(crate) struct PutInfo {
    class: Class,
    dedup_hit: bool,
    pub stored_bytes: u64,
}

/// Content prepared for a put.
enum Prep<'a> {
    Zero,
    /// The content is stored already: a reference on it.
    Hit(u32),
    New(super::content::Key, NewData<'a>),
}

/// Writes a record of the client `acct` made by `f` (given its durable
/// number) to its domain's journal, with a crash-safe state.
pub(crate) fn log_client(table: &Table, acct: &Acct, f: impl FnOnce(u32) -> Record) {
    if let Some(l) = &table.domain.log {
        l.append(&f(acct.client_id as u32));
    }
}

/// An exclusive get's removal still to record: see
/// [`DataHandle::get_taking`]. Dropping it records the removal and
/// releases the page.
#[derive(Debug)]
#[must_use = "dropping it at once records the removal before the answer is published"]
pub struct Taken {
    store: Arc<Store>,
    pool: Arc<Pool>,
    object: ObjectId,
    index: u64,
    value: u32,
}

impl Taken {
    /// Leaves the removal unrecorded and the page unreleased, as a crash
    /// before the answer was published would (for tests).
    #[doc(hidden)]
    pub fn abandon(self) {
        let mut me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never used or dropped again, so its `store` is
        // dropped exactly once, here.
        unsafe { std::ptr::drop_in_place(&mut me.store) };
        // SAFETY: as for `store`.
        unsafe { std::ptr::drop_in_place(&mut me.pool) };
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.pool
            .settle_taken(&self.object, self.index, self.value, &self.store.g);
    }
}

/// The persistent pool `pool` of a live client: where reservations go.
/// Whether pool `pool` of `table` is one whose pages a crash-safe state
/// records: a private persistent pool.
fn records_pages_of(table: &Table, pool: u32) -> bool {
    table
        .pool(pool)
        .is_some_and(|p| p.persistent && p.shared.is_none())
}

fn reservable(table: &Table, pool: u32) -> Result<&Arc<Pool>, TmemError> {
    if table.removed {
        return Err(TmemError::ClientGone);
    }
    let pool = table.pool(pool).ok_or(TmemError::NoPool)?;
    if !pool.persistent {
        return Err(TmemError::Invalid("reservations need a persistent pool"));
    }
    Ok(pool)
}

/// The stored form of a data page: `given` if it came stored, else
/// [`compressed`].
fn encoded<'b>(
    given: Option<NewData<'b>>,
    page: &Page,
    buf: &'b mut [u8; LZ4_BOUND],
) -> NewData<'b> {
    given.unwrap_or_else(|| compressed(page, buf))
}

/// `page` LZ4-compressed into `buf`, or raw if that does not pay.
fn compressed<'b>(page: &Page, buf: &'b mut [u8; LZ4_BOUND]) -> NewData<'b> {
    match compress(page, buf) {
        Some(n) => NewData::Lz4(&buf[..n]),
        None => NewData::Raw,
    }
}

impl DataHandle {
    /// The client's name.
    pub fn name(&self) -> &str {
        &self.client.name
    }

    fn acct(&self) -> &Arc<Acct> {
        &self.client.acct
    }

    fn count(
        &self,
        pool: Option<&Pool>,
        f: impl Fn(&AtomicCounters) -> &std::sync::atomic::AtomicU64,
    ) {
        bump(f(&self.acct().counters));
        if let Some(p) = pool {
            bump(f(&p.counters));
        }
    }

    /// Creates a pool, or joins the shared pool named by `spec.shared`.
    ///
    /// Private ephemeral pools always have exclusive gets, shared pools
    /// never; persistent pools follow `spec.exclusive_gets`. A client that
    /// already has the shared pool open gets the same id again.
    pub fn new_pool(&self, spec: PoolSpec) -> Result<u32, TmemError> {
        self.new_pool_at(spec, None)
    }

    /// Runs a non-idempotent operation of a guest request, `at` naming
    /// the request (its queue, ring position and tag) and the operation's
    /// index in it (docs/protocol.md section 8, "Requests offered twice").
    ///
    /// If the client's pending table holds an entry for the same request
    /// and operation, with the same tag, opcode and what it named (the
    /// `NEW_POOL` flags, the pool id), the operation ran already and its
    /// answer may not have reached the guest: that answer is returned and
    /// nothing runs (`replayed`). Otherwise it runs, and with a crash-safe
    /// state its record carries `at` and its answer, and an entry is
    /// added (replacing one at the same place), to stay until
    /// [`DataHandle::settle_requests`] is told the answer is in the used
    /// ring. An operation that fails changes nothing and records nothing.
    /// Without `at` (the store's own callers), it just runs.
    pub fn run_once(&self, op: OnceOp, at: Option<OpRef>) -> OnceAnswer {
        if let Some(value) = at.and_then(|at| self.recorded_answer(&op, at)) {
            return OnceAnswer {
                result: Ok(value),
                replayed: true,
            };
        }
        let result = match op {
            OnceOp::NewPool(spec) => self.new_pool_at(spec, at).map(u64::from),
            OnceOp::DestroyPool(pool) => self.destroy_pool_at(pool, at).map(|()| 0),
            OnceOp::Reserve { pool, pages } => self.reserve_at(pool, pages, at),
            OnceOp::Unreserve { pool, pages } => self.unreserve_at(pool, pages, at),
            OnceOp::Reset => {
                self.reset_at(at);
                Ok(0)
            }
        };
        OnceAnswer {
            result,
            replayed: false,
        }
    }

    /// The answer of `op` at `at` if the pending table holds it.
    fn recorded_answer(&self, op: &OnceOp, at: OpRef) -> Option<u64> {
        let pending = self.client.pending.lock();
        let p = pending.get(&(at.queue, at.position, at.op))?;
        (p.tag == at.tag && p.opcode == op.opcode() && Some(p.asked) == op.asked())
            .then_some(p.value)
    }

    /// Adds the pending entry of an operation of the request `at` whose
    /// record was written (with a crash-safe state: `logged`). Call it
    /// under the lock the record was written under.
    fn note_pending(&self, logged: bool, at: Option<OpRef>, opcode: u8, asked: u8, value: u64) {
        if let (true, Some(at)) = (logged, at) {
            self.client.pending.lock().insert(
                (at.queue, at.position, at.op),
                Pending {
                    tag: at.tag,
                    opcode,
                    asked,
                    value,
                },
            );
        }
    }

    /// The answers of the requests at `positions` of `queue` are in the
    /// used ring: each that has pending entries gets a `Settled` record
    /// and loses them. Requests without entries cost a look-up.
    pub fn settle_requests(&self, queue: u16, positions: &[u16]) {
        if positions.is_empty() {
            return;
        }
        // The table lock is taken before the pending one (never after).
        let domain = self.client.table.read().domain.clone();
        let mut pending = self.client.pending.lock();
        for &position in positions {
            let before = pending.len();
            pending.retain(|&(q, p, _), _| (q, p) != (queue, position));
            if pending.len() != before {
                if let Some(l) = &domain.log {
                    l.append(&Record::Settled {
                        client: self.acct().client_id as u32,
                        queue,
                        position,
                    });
                }
            }
        }
    }

    /// Queue `queue` starts at ring position `base` with `size` entries:
    /// the requests offered again are those from `base` on, so the pending
    /// entries of the queue at positions outside `[base, base + size)`
    /// (mod 2^16) were answered (a crash came between the used ring and
    /// their `Settled` record) and are settled now. Returns the positions
    /// of the queue that still have entries: the requests there are to be
    /// settled once answered, whatever they hold.
    pub fn start_queue(&self, queue: u16, base: u16, size: u16) -> Vec<u16> {
        let mut stale = Vec::new();
        let mut kept = Vec::new();
        {
            let pending = self.client.pending.lock();
            for &(q, p, _) in pending.keys() {
                if q != queue {
                    continue;
                }
                let list = if p.wrapping_sub(base) < size {
                    &mut kept
                } else {
                    &mut stale
                };
                if list.last() != Some(&p) {
                    list.push(p);
                }
            }
        }
        self.settle_requests(queue, &stale);
        kept
    }

    /// The client's pending table (for tests).
    #[doc(hidden)]
    pub fn pending_ops(&self) -> Vec<(PendingKey, Pending)> {
        self.client
            .pending
            .lock()
            .iter()
            .map(|(k, p)| (*k, *p))
            .collect()
    }

    fn new_pool_at(&self, spec: PoolSpec, at: Option<OpRef>) -> Result<u32, TmemError> {
        self.journal_room()?;
        let mut table = self.client.table.write();
        if table.removed {
            return Err(TmemError::ClientGone);
        }
        if let Some(uuid) = spec.shared {
            if spec.persistent {
                return Err(TmemError::Invalid("shared pools must be ephemeral"));
            }
            let open = table
                .pools
                .iter()
                .position(|p| p.as_ref().is_some_and(|p| p.shared == Some(uuid)));
            if let Some(id) = open {
                return Ok(id as u32);
            }
            if !self.authorized(&uuid) {
                return Err(TmemError::NotAuthorized);
            }
        }
        let slot = table
            .pools
            .iter()
            .position(Option::is_none)
            .ok_or(TmemError::TooManyPools)?;
        self.open_pool(&mut table, slot, spec, true, at);
        let logged = table.domain.log.is_some();
        self.note_pending(logged, at, OPCODE_NEW_POOL, spec.flags(), slot as u64);
        Ok(slot as u32)
    }

    /// Whether the administrator authorised this client for the shared
    /// pool `uuid`.
    pub(crate) fn authorized(&self, uuid: &Uuid) -> bool {
        self.client
            .meta
            .lock()
            .authorized
            .binary_search(uuid)
            .is_ok()
    }

    /// Opens a pool at the free `slot` of `table` (joining the shared pool
    /// of `spec.shared`, whose authorisation the caller checked).
    /// `log`: write its `NEW_POOL` record (not when the pool is recovered
    /// from one), naming the request `at` if there is one.
    pub(crate) fn open_pool(
        &self,
        table: &mut Table,
        slot: usize,
        spec: PoolSpec,
        log: bool,
        at: Option<OpRef>,
    ) {
        if log {
            // Ephemeral pools too, so that their ids survive.
            log_client(table, self.acct(), |client| Record::NewPool {
                client,
                pool: slot as u8,
                flags: spec.flags(),
                uuid: spec.shared,
                op: at,
            });
        }
        let pool = match spec.shared {
            Some(uuid) => self.store.join_shared(uuid, self.acct()),
            None => {
                let exclusive = !spec.persistent || spec.exclusive_gets;
                let journal = table.domain.log.as_ref().map(|log| PoolLog {
                    log: log.clone(),
                    client: self.acct().client_id as u32,
                    pool: slot as u8,
                });
                let pool = Arc::new(Pool::new(
                    spec.persistent,
                    exclusive,
                    None,
                    table.domain.clone(),
                    self.acct().clone(),
                    self.store.hasher,
                    journal,
                ));
                if !spec.persistent {
                    self.store.evictable.add(self.acct(), &pool);
                }
                pool
            }
        };
        table.pools[slot] = Some(pool);
    }

    /// Destroys a pool (or leaves a shared one) and every page in it.
    pub fn destroy_pool(&self, pool: u32) -> Result<(), TmemError> {
        self.destroy_pool_at(pool, None)
    }

    fn destroy_pool_at(&self, pool: u32, at: Option<OpRef>) -> Result<(), TmemError> {
        let mut table = self.client.table.write();
        if table.removed {
            return Err(TmemError::ClientGone);
        }
        let p = table
            .pools
            .get_mut(pool as usize)
            .and_then(Option::take)
            .ok_or(TmemError::NoPool)?;
        log_client(&table, self.acct(), |client| Record::DestroyPool {
            client,
            pool: pool as u8,
            op: at,
        });
        let logged = table.domain.log.is_some();
        self.note_pending(logged, at, OPCODE_DESTROY_POOL, pool as u8, 0);
        self.store.leave_pool(&p, self.acct());
        Ok(())
    }

    /// Stores a copy of `page` under `handle`. `reserved`: spend one page of
    /// the pool's reservation (never refused for space, quota or freeze).
    ///
    /// On any refusal the handle's old copy is dropped.
    pub fn put(&self, handle: &Handle, page: &Page, reserved: bool) -> Result<(), TmemError> {
        if self.journal_tight(handle.pool) && self.journal_room().is_err() {
            return self.refuse_unrecordable_put(handle);
        }
        let r = self.put_counted(handle, page, reserved);
        self.checkpoint_if_due();
        r
    }

    /// Whether a put into `pool` must first make sure of room in the
    /// journal ([`DataHandle::journal_room`]): its pages are recorded and
    /// the domain's journal is near its end. One lock and two atomic
    /// loads, so that a put with a state costs little more than one
    /// without.
    fn journal_tight(&self, pool: u32) -> bool {
        if self.store.persist.is_none() {
            return false;
        }
        let table = self.client.table.read();
        records_pages_of(&table, pool) && table.domain.log.as_ref().is_some_and(|l| l.is_tight())
    }

    /// With a crash-safe state: whether pool `pool` is one whose pages
    /// are recorded.
    fn records_pages(&self, pool: u32) -> bool {
        self.store.persist.is_some() && records_pages_of(&self.client.table.read(), pool)
    }

    /// With a crash-safe state: `Ok` if the client's journal has room for
    /// an operation that adds to the state; else a checkpoint is tried
    /// (call it with none of the client's locks held) and `NoSpace` is
    /// the answer if there is still none, so that no operation is
    /// answered whose record a full journal would lose.
    fn journal_room(&self) -> Result<(), TmemError> {
        if self.store.persist.is_none() {
            return Ok(());
        }
        let domain = self.client.table.read().domain.clone();
        let Some(log) = &domain.log else {
            return Ok(());
        };
        match log.room() {
            Room::Yes => return Ok(()),
            // A checkpoint would need room on the same file system; the
            // journal logged the cause once.
            Room::FileSystemFull => return Err(TmemError::NoSpace),
            Room::JournalFull => {}
        }
        if let Err(e) = self.store.checkpoint(&domain) {
            log::error!("checkpoint of a dedup domain failed: {e}");
        }
        if log.has_room() {
            Ok(())
        } else {
            log::warn!(
                "client {}: its journal is full and could not be checkpointed: refused",
                self.client.name
            );
            Err(TmemError::NoSpace)
        }
    }

    /// A put refused because its record could not be written: the
    /// handle's old copy is dropped, as on any refusal.
    fn refuse_unrecordable_put(&self, handle: &Handle) -> Result<(), TmemError> {
        let table = self.client.table.read();
        if table.removed {
            return Err(TmemError::ClientGone);
        }
        let Some(pool) = table.pool(handle.pool) else {
            return Err(TmemError::NoPool);
        };
        self.count(Some(pool), |c| &c.puts);
        self.count(Some(pool), |c| &c.puts_refused_other);
        pool.remove(&handle.object, handle.index, &self.store.g);
        Err(TmemError::NoSpace)
    }

    /// With a crash-safe state: checkpoints the client's domain if its
    /// journal has grown past its bound (no lock held).
    #[inline]
    fn checkpoint_if_due(&self) {
        if self.store.persist.is_none() {
            return;
        }
        let domain = {
            let table = self.client.table.read();
            if !table.domain.log.as_ref().is_some_and(|l| l.is_due()) {
                return;
            }
            table.domain.clone()
        };
        self.store.checkpoint_if_due(&domain);
    }

    fn put_counted(&self, handle: &Handle, page: &Page, reserved: bool) -> Result<(), TmemError> {
        let table = self.client.table.read();
        if table.removed {
            return Err(TmemError::ClientGone);
        }
        let Some(pool) = table.pool(handle.pool) else {
            self.count(None, |c| &c.puts);
            self.count(None, |c| &c.puts_refused_other);
            return Err(TmemError::NoPool);
        };
        self.count(Some(pool), |c| &c.puts);
        let res = LZ4_BUF.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => self.put_inner(pool, handle, page, reserved, &mut buf, None),
            Err(_) => self.put_inner(pool, handle, page, reserved, &mut [0u8; LZ4_BOUND], None),
        });
        match res {
            Ok(info) => {
                let p = Some(&**pool);
                self.count(p, |c| &c.puts_stored);
                match info.class {
                    Class::Zero => self.count(p, |c| &c.zero_pages),
                    Class::Same(_) => self.count(p, |c| &c.same_filled_pages),
                    Class::Data => {}
                }
                if info.dedup_hit {
                    self.count(p, |c| &c.dedup_hits);
                }
                for ctr in [&self.acct().counters, &pool.counters] {
                    bump_by(&ctr.bytes_in, PAGE_SIZE as u64);
                    bump_by(&ctr.bytes_stored, info.stored_bytes);
                }
                Ok(())
            }
            Err(e) => {
                // Never leave the old data readable.
                pool.remove(&handle.object, handle.index, &self.store.g);
                let p = Some(&**pool);
                match e {
                    TmemError::NoSpace => self.count(p, |c| &c.puts_refused_no_space),
                    TmemError::OverQuota => self.count(p, |c| &c.puts_refused_quota),
                    TmemError::Frozen => self.count(p, |c| &c.puts_refused_frozen),
                    _ => self.count(p, |c| &c.puts_refused_other),
                }
                Err(e)
            }
        }
    }

    /// Stores `page` at `h`. `given`: the page's stored form when it comes
    /// stored already (an imported page), used instead of compressing it.
    pub(crate) fn put_inner(
        &self,
        pool: &Arc<Pool>,
        h: &Handle,
        page: &Page,
        reserved: bool,
        buf: &mut [u8; LZ4_BOUND],
        given: Option<NewData<'_>>,
    ) -> Result<PutInfo, TmemError> {
        let g = &self.store.g;
        if reserved {
            if !pool.persistent {
                return Err(TmemError::NoReservation);
            }
            if !pool.take_reserved_page() {
                return Err(TmemError::NoReservation);
            }
        } else if self.acct().frozen.load(Ordering::Acquire) {
            return Err(TmemError::Frozen);
        }
        // The account charged: the writer, in a shared pool too.
        let charged: &Acct = self.acct();

        // The handle's old copy goes first: a put replaces it whether or not
        // it succeeds, and a reference held by it must not make room look
        // scarcer than it is.
        pool.remove(&h.object, h.index, g);

        // Admission is decided on the page's size as if its content were
        // new, so whether a put is accepted never depends on what other VMs
        // store (a dedup hit would otherwise fit where a fresh page does
        // not, telling a VM that a neighbour holds the page). The size of
        // content stored already is looked up without taking a reference
        // (LZ4 is deterministic, so it is what a new copy would take, and
        // a hit needs no compression); nothing is held while charging, so
        // evictions made for this put free what they evict. A hit then
        // gives the shared content's charge back.
        let domain = &pool.domain;
        let class = classify(page);
        // `content_growth`: what a new content would grow the shard's
        // tables by (nothing for a zero page or content already held).
        let (key, known, data, content_growth) = match class {
            Class::Zero => (None, None, None, 0),
            Class::Same(w) => {
                let key = domain.pattern_key(w);
                let growth = if reserved {
                    0
                } else {
                    domain.insert_growth(&key)
                };
                (Some(key), None, Some(NewData::Pattern), growth)
            }
            Class::Data => {
                let key = domain.data_key(page);
                match domain.peek(&key, page) {
                    Ok(bytes) => (Some(key), Some(bytes), None, 0),
                    Err(growth) => (Some(key), None, Some(encoded(given, page, buf)), growth),
                }
            }
        };
        let slot = known
            .or(data.as_ref().map(NewData::slot_bytes))
            .unwrap_or(0);
        let unshared_host_cost = match key {
            None => PAGE_METADATA_COST,
            Some(_) => slot + CONTENT_METADATA_COST + PAGE_METADATA_COST,
        };
        let mut client_cost = slot + CLIENT_PAGE_COST;
        // Room for the tables this put may grow (a doubled hash table, a
        // new block of entries), found now so that eviction can make it;
        // given back once the growth itself is charged as overhead.
        let growth = if reserved {
            0
        } else {
            pool.insert_growth(&h.object, h.index) + content_growth
        };
        if reserved {
            // Swap the worst-case charge for the real one (never larger).
            account::uncharge(
                &charged.pers_charged,
                RESERVED_PAGE_CLIENT_COST - client_cost,
            );
            g.uncharge(RESERVED_PAGE_HOST_COST - unshared_host_cost);
        } else {
            self.charge(pool, charged, client_cost, unshared_host_cost + growth)?;
        }
        let prep = match (key, data) {
            (None, _) => Prep::Zero,
            (Some(key), Some(data)) => Prep::New(key, data),
            (Some(key), None) => match domain.acquire(&key, page, pool.persistent) {
                Some((r, _)) => {
                    g.uncharge(unshared_host_cost - PAGE_METADATA_COST);
                    Prep::Hit(r)
                }
                // Gone since it was looked up: store it anew (paid for).
                None => Prep::New(key, encoded(given, page, buf)),
            },
        };

        let pattern = matches!(class, Class::Same(_));
        let persistent = pool.persistent;
        let (value, dedup_hit, stored_bytes) = match prep {
            Prep::Zero => (ZERO_REF, false, 0),
            Prep::Hit(r) => (r | DEDUP_BIT, true, 0),
            Prep::New(key, data) => match domain.insert(&key, page, persistent, data) {
                Some(Inserted::New(r)) => (r, false, data.stored_bytes()),
                Some(Inserted::Existing(r, bytes)) => {
                    // An equal put won the race: no new content after all.
                    let unique = data.slot_bytes() + CONTENT_METADATA_COST;
                    g.uncharge(unique);
                    let real = bytes + CLIENT_PAGE_COST;
                    let (ctr, _) = charged.kind(pool.persistent);
                    if real > client_cost {
                        account::charge(ctr, real - client_cost);
                    } else {
                        account::uncharge(ctr, client_cost - real);
                    }
                    client_cost = real;
                    (r | DEDUP_BIT, true, 0)
                }
                None => {
                    charged.uncharge(pool.persistent, client_cost);
                    g.uncharge(unshared_host_cost + growth);
                    if reserved {
                        pool.reserved_put_failed();
                    }
                    return Err(TmemError::NoSpace);
                }
            },
        };

        // Gives back everything this put took, when it cannot be stored
        // after all.
        let unwind = |error: TmemError| {
            if reserved {
                pool.reserved_put_failed();
            }
            charged.uncharge(pool.persistent, client_cost);
            g.uncharge(PAGE_METADATA_COST + growth);
            if value & super::content::ID_MASK != ZERO_REF {
                let rel = domain.release(value & super::content::ID_MASK);
                if rel.freed {
                    g.uncharge(rel.data_bytes + CONTENT_METADATA_COST);
                }
            }
            Err(error)
        };
        let mut idx = pool.lock();
        if idx.destroyed {
            drop(idx);
            return unwind(TmemError::NoPool);
        }
        let new = NewPage {
            value,
            client_cost,
            pattern,
            reserved,
            log: true,
        };
        if pool
            .store_locked(&mut idx, &h.object, h.index, new, self.acct(), g)
            .is_err()
        {
            // The index is full (2^28 blocks): refuse like a full host.
            drop(idx);
            return unwind(TmemError::NoSpace);
        }
        drop(idx);
        // The tables have grown (if they did) and that is overhead now.
        g.uncharge(growth);
        Ok(PutInfo {
            class,
            dedup_hit,
            stored_bytes,
        })
    }

    /// Charges a put's costs, evicting ephemeral pages as the rules allow.
    fn charge(
        &self,
        pool: &Pool,
        charged: &Acct,
        client_cost: u64,
        host_cost: u64,
    ) -> Result<(), TmemError> {
        let g = &self.store.g;
        let persistent = pool.persistent;
        let mut rounds = 0;
        while !charged.try_charge(persistent, client_cost) {
            if persistent || rounds >= MAX_EVICT_ROUNDS {
                return Err(TmemError::OverQuota);
            }
            rounds += 1;
            if self
                .store
                .evict_own(charged, charged.eph_excess(client_cost))
                .pages
                == 0
            {
                return Err(TmemError::OverQuota);
            }
        }
        let mut rounds = 0;
        while !g.try_charge(host_cost) {
            rounds += 1;
            if rounds > MAX_EVICT_ROUNDS
                || self
                    .store
                    .evict_weighted(g.excess(host_cost).max(1), Some(charged))
                    .pages
                    == 0
            {
                charged.uncharge(persistent, client_cost);
                return Err(TmemError::NoSpace);
            }
        }
        Ok(())
    }

    /// Copies the page at `handle` into `out`. Ok(true) = hit; Ok(false) =
    /// miss (`out` untouched); an error may leave `out` partly written.
    ///
    /// `out` is only ever stored into: the page is produced by a zero or
    /// pattern fill, a copy, or the lz4 decompressor (safe Rust, whose
    /// bounds come from the compressed input, never from bytes already
    /// written), and nothing is read back from `out` to decide anything.
    /// A caller may therefore hand over memory that someone else writes
    /// meanwhile (a guest's own page buffer): the result can only be wrong
    /// bytes in `out`. Keep it so.
    pub fn get(&self, handle: &Handle, out: &mut Page) -> Result<bool, TmemError> {
        let (hit, taken) = self.get_taking(handle, out)?;
        drop(taken);
        Ok(hit)
    }

    /// As [`DataHandle::get`], for a caller that publishes the answer
    /// itself: a hit in a persistent pool with exclusive gets, in a store
    /// with a crash-safe state, also returns a [`Taken`], which records
    /// the page's removal (and releases the page) when it is dropped. Drop
    /// it once the answer is published (in the used ring): a get that a
    /// crash made the guest send again then finds the page (rule 5 of the
    /// design). Meanwhile the handle reads as empty.
    pub fn get_taking(
        &self,
        handle: &Handle,
        out: &mut Page,
    ) -> Result<(bool, Option<Taken>), TmemError> {
        let table = self.client.table.read();
        if table.removed {
            return Err(TmemError::ClientGone);
        }
        let Some(pool) = table.pool(handle.pool) else {
            self.count(None, |c| &c.gets);
            return Err(TmemError::NoPool);
        };
        self.count(Some(pool), |c| &c.gets);
        let got = pool
            .get_deferring(&handle.object, handle.index, out, &self.store.g)
            .map(|got| match got {
                Got::Miss => (false, None),
                Got::Hit => (true, None),
                Got::Taken(value) => (
                    true,
                    Some(Taken {
                        store: self.store.clone(),
                        pool: pool.clone(),
                        object: handle.object,
                        index: handle.index,
                        value,
                    }),
                ),
            });
        match got {
            Ok((hit, taken)) => {
                if hit {
                    self.count(Some(pool), |c| &c.get_hits);
                } else {
                    self.count(Some(pool), |c| &c.get_misses);
                }
                Ok((hit, taken))
            }
            Err(_) => {
                log::error!(
                    "client {}: stored page of pool {} failed its integrity check",
                    self.client.name,
                    handle.pool
                );
                self.count(Some(pool), |c| &c.get_misses);
                Err(TmemError::Busy("stored page is corrupt"))
            }
        }
    }

    /// Drops one page (no error if there is none).
    pub fn flush_page(&self, handle: &Handle) -> Result<(), TmemError> {
        {
            let table = self.client.table.read();
            if table.removed {
                return Err(TmemError::ClientGone);
            }
            let pool = table.pool(handle.pool).ok_or(TmemError::NoPool)?;
            self.count(Some(pool), |c| &c.flush_pages);
            pool.remove(&handle.object, handle.index, &self.store.g);
        }
        self.checkpoint_if_due();
        Ok(())
    }

    /// Drops every page of an object.
    pub fn flush_object(&self, pool: u32, object: &ObjectId) -> Result<(), TmemError> {
        {
            let table = self.client.table.read();
            if table.removed {
                return Err(TmemError::ClientGone);
            }
            let pool = table.pool(pool).ok_or(TmemError::NoPool)?;
            self.count(Some(pool), |c| &c.flush_objects);
            pool.remove_object(object, &self.store.g);
        }
        self.checkpoint_if_due();
        Ok(())
    }

    /// Reserves room for up to `pages` puts in a persistent pool; returns
    /// the pages granted (0..=pages), charged up front.
    ///
    /// A grant is bounded three ways: at most [`MAX_RESERVE_PAGES`] per
    /// request; within the client's persistent quota; and within its
    /// weighted share of the host (`limit × weight / total weight`, less
    /// what it already holds persistently or reserved), so that one VM's
    /// reservation cannot take the room every other VM's puts need. Room
    /// is made by evicting ephemeral pages only as [`Store::evict_weighted`]
    /// allows for a requester.
    pub fn reserve(&self, pool: u32, pages: u64) -> Result<u64, TmemError> {
        self.reserve_at(pool, pages, None)
    }

    fn reserve_at(&self, pool_id: u32, pages: u64, at: Option<OpRef>) -> Result<u64, TmemError> {
        if self.records_pages(pool_id) {
            self.journal_room()?;
        }
        let table = self.client.table.read();
        let pool = reservable(&table, pool_id)?;
        if self.acct().frozen.load(Ordering::Acquire) {
            return Err(TmemError::Frozen);
        }
        let g = &self.store.g;
        let acct = self.acct();
        let share = self.store.weighted_share(acct);
        let fair_pages = share.saturating_sub(acct.pers_charged.load(Ordering::Acquire))
            / RESERVED_PAGE_HOST_COST;
        let asked = pages.min(MAX_RESERVE_PAGES).min(fair_pages);
        let quota = acct.pers_quota.load(Ordering::Acquire);
        let wanted =
            account::try_charge_units(&acct.pers_charged, RESERVED_PAGE_CLIENT_COST, asked, quota);
        let mut granted = 0;
        let mut rounds = 0;
        while granted < wanted {
            granted += account::try_charge_units(
                &g.host_used,
                RESERVED_PAGE_HOST_COST,
                wanted - granted,
                g.room_limit(),
            );
            if granted == wanted || rounds >= MAX_EVICT_ROUNDS {
                break;
            }
            rounds += 1;
            // At most MAX_RESERVE_PAGES pages: the product cannot overflow.
            let need = g.excess((wanted - granted) * RESERVED_PAGE_HOST_COST);
            if self.store.evict_weighted(need.max(1), Some(acct)).pages == 0 {
                // Whatever is free now is all there will be.
                granted += account::try_charge_units(
                    &g.host_used,
                    RESERVED_PAGE_HOST_COST,
                    wanted - granted,
                    g.room_limit(),
                );
                break;
            }
        }
        account::uncharge(
            &acct.pers_charged,
            (wanted - granted) * RESERVED_PAGE_CLIENT_COST,
        );
        let idx = pool.lock();
        if idx.destroyed {
            drop(idx);
            account::uncharge(&acct.pers_charged, granted * RESERVED_PAGE_CLIENT_COST);
            g.uncharge(granted * RESERVED_PAGE_HOST_COST);
            return Err(TmemError::NoPool);
        }
        pool.reserved.fetch_add(granted, Ordering::AcqRel);
        if granted > 0 {
            let logged = pool.log_reserve(&idx, at.map(|a| (a, false, granted)));
            self.note_pending(logged, at, OPCODE_RESERVE, pool_id as u8, granted);
        }
        Ok(granted)
    }

    /// Charges `pages` reserved pages to a persistent pool, all or none:
    /// a reservation a guest holds, brought from another host. Bound by the
    /// persistent quota and the host limit (evicting as a put may), not by
    /// the per-request grant limit.
    pub(crate) fn reinstate_reservation(&self, pool: u32, pages: u64) -> Result<(), TmemError> {
        if pages == 0 {
            return Ok(());
        }
        let table = self.client.table.read();
        let pool = reservable(&table, pool)?;
        let client_cost = pages
            .checked_mul(RESERVED_PAGE_CLIENT_COST)
            .ok_or(TmemError::OverQuota)?;
        let host_cost = pages
            .checked_mul(RESERVED_PAGE_HOST_COST)
            .ok_or(TmemError::NoSpace)?;
        self.charge(pool, self.acct(), client_cost, host_cost)?;
        let idx = pool.lock();
        pool.reserved.fetch_add(pages, Ordering::AcqRel);
        pool.log_reserve(&idx, None);
        Ok(())
    }

    /// Gives back up to `pages` unspent reserved pages; returns the pages
    /// still reserved afterwards.
    pub fn unreserve(&self, pool: u32, pages: u64) -> Result<u64, TmemError> {
        self.unreserve_at(pool, pages, None)
    }

    fn unreserve_at(&self, pool_id: u32, pages: u64, at: Option<OpRef>) -> Result<u64, TmemError> {
        let table = self.client.table.read();
        let pool = reservable(&table, pool_id)?;
        let mut returned = 0;
        let idx = pool.lock();
        let prev = pool
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                returned = r.min(pages);
                Some(r - returned)
            })
            .unwrap_or(0);
        let left = prev - returned;
        if returned > 0 {
            let logged = pool.log_reserve(&idx, at.map(|a| (a, true, left)));
            self.note_pending(logged, at, OPCODE_UNRESERVE, pool_id as u8, left);
        }
        drop(idx);
        account::uncharge(
            &self.acct().pers_charged,
            returned * RESERVED_PAGE_CLIENT_COST,
        );
        self.store.g.uncharge(returned * RESERVED_PAGE_HOST_COST);
        Ok(left)
    }

    /// Device reset / guest reboot: destroys every pool of this client
    /// (leaves shared ones), keeping the client and its settings.
    pub fn reset(&self) {
        self.reset_at(None)
    }

    fn reset_at(&self, at: Option<OpRef>) {
        let mut table = self.client.table.write();
        if table.removed {
            return;
        }
        log_client(&table, self.acct(), |client| Record::Reset {
            client,
            op: at,
        });
        // The pending entries were of the driver before the reset: none
        // may answer a request of the one after it (which starts its
        // rings and tags again).
        self.client.pending.lock().clear();
        let logged = table.domain.log.is_some();
        self.note_pending(logged, at, OPCODE_RESET, 0, 0);
        for slot in table.pools.iter_mut() {
            if let Some(pool) = slot.take() {
                self.store.leave_pool(&pool, self.acct());
            }
        }
    }
}

impl AdminHandle {
    pub(crate) fn new(store: Arc<Store>, client: Arc<Client>) -> Self {
        AdminHandle { store, client }
    }

    /// The client's data path, for the device that serves its guest.
    pub fn data(&self) -> DataHandle {
        DataHandle {
            store: self.store.clone(),
            client: self.client.clone(),
        }
    }

    /// The client's name.
    pub fn name(&self) -> &str {
        &self.client.name
    }

    fn acct(&self) -> &Arc<Acct> {
        &self.client.acct
    }

    /// Sets both quotas (bytes). Lowering the ephemeral quota evicts at
    /// once; lowering the persistent quota below use refuses new puts and
    /// never drops pages.
    pub fn set_quota(&self, persistent: u64, ephemeral: u64) {
        let acct = self.acct();
        acct.pers_quota.store(persistent, Ordering::Release);
        acct.eph_quota.store(ephemeral, Ordering::Release);
        let excess = acct.eph_excess(0);
        if excess > 0 {
            self.store.evict_own(acct, excess);
        }
    }

    /// Sets the weight for sharing ephemeral capacity (at least 1).
    pub fn set_weight(&self, weight: u32) -> Result<(), TmemError> {
        if weight == 0 {
            return Err(TmemError::Invalid("weight must be at least 1"));
        }
        self.acct().weight.store(weight, Ordering::Release);
        Ok(())
    }

    /// Refuses puts (except reserved ones) until [`AdminHandle::thaw`].
    pub fn freeze(&self) {
        self.acct().frozen.store(true, Ordering::Release);
    }

    /// Accepts puts again.
    pub fn thaw(&self) {
        self.acct().frozen.store(false, Ordering::Release);
    }

    /// Drops the pages of every pool charged to this client (only the
    /// ephemeral ones if `ephemeral_only`); pools and reservations stay.
    pub fn flush_all(&self, ephemeral_only: bool) {
        let table = self.client.table.read();
        if table.removed {
            return;
        }
        for pool in table.pools.iter().flatten() {
            if ephemeral_only && pool.persistent {
                continue;
            }
            let mut idx = pool.lock();
            pool.clear_charged_to(&mut idx, self.acct(), &self.store.g);
        }
    }

    /// Allows the client to create or join the shared pool `uuid`.
    pub fn authorize(&self, uuid: Uuid) {
        let mut meta = self.client.meta.lock();
        if let Err(pos) = meta.authorized.binary_search(&uuid) {
            meta.authorized.insert(pos, uuid);
        }
    }

    /// Withdraws the authorisation and leaves the shared pool of that UUID
    /// if the client has joined it: its pool id becomes unknown (`NO_POOL`)
    /// while the pool and its pages stay for the other members. Returns the
    /// number of pool ids closed.
    pub fn deauthorize(&self, uuid: Uuid) -> usize {
        {
            let mut meta = self.client.meta.lock();
            if let Ok(pos) = meta.authorized.binary_search(&uuid) {
                meta.authorized.remove(pos);
            }
        }
        let mut table = self.client.table.write();
        if table.removed {
            return 0;
        }
        let mut closed = 0;
        let log = table.domain.log.clone();
        for (id, slot) in table.pools.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|p| p.shared == Some(uuid)) {
                if let Some(l) = &log {
                    l.append(&Record::DestroyPool {
                        client: self.client.acct.client_id as u32,
                        pool: id as u8,
                        op: None,
                    });
                }
                if let Some(pool) = slot.take() {
                    self.store.leave_pool(&pool, self.acct());
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Whether puts are refused (`freeze`).
    pub fn is_frozen(&self) -> bool {
        self.acct().frozen.load(Ordering::Acquire)
    }

    /// Moves the client to another dedup group (None: its own domain).
    /// `Busy` if any of its private pools holds pages.
    pub fn set_dedup_group(&self, group: Option<String>) -> Result<(), TmemError> {
        let mut table = self.client.table.write();
        if table.removed {
            return Err(TmemError::ClientGone);
        }
        let mut meta = self.client.meta.lock();
        if meta.dedup_group == group {
            return Ok(());
        }
        let private = |p: &&Arc<Pool>| p.shared.is_none();
        if table
            .pools
            .iter()
            .flatten()
            .filter(private)
            .any(|p| p.lock().gauges.pages > 0)
        {
            return Err(TmemError::Busy("the client holds pages"));
        }
        if self.store.persist.is_some() {
            // TODO: records for the move between journals.
            return Err(TmemError::Busy(
                "a store with a crash-safe state cannot move a client to another dedup group yet",
            ));
        }
        let domain = self.store.domain_for(group.as_deref(), 0)?;
        let acct = self.acct();
        // No data-path call of this client runs (we hold its table), and
        // the pools are empty: swap each for a pool in the new domain.
        for slot in table.pools.iter_mut() {
            let Some(old) = slot.as_ref().filter(|p| p.shared.is_none()).cloned() else {
                continue;
            };
            let new = Arc::new(Pool::new(
                old.persistent,
                old.exclusive_gets,
                None,
                domain.clone(),
                acct.clone(),
                self.store.hasher,
                None,
            ));
            {
                let mut idx = old.lock();
                idx.destroyed = true;
                old.clear_locked(&mut idx, &self.store.g);
            }
            new.reserved
                .store(old.take_reservation(), Ordering::Release);
            new.counters.absorb(&old.counters.snapshot());
            self.store.evictable.remove(acct, &old);
            if !new.persistent {
                self.store.evictable.add(acct, &new);
            }
            *slot = Some(new);
        }
        table.domain = domain;
        meta.dedup_group = group;
        Ok(())
    }

    /// The client's current configuration.
    pub fn config(&self) -> ClientConfig {
        self.client.config()
    }

    /// The client's statistics.
    pub fn stats(&self) -> ClientStats {
        self.client.stats().0
    }

    /// Evicts up to `pages` of this client's oldest ephemeral pages (an
    /// admin helper, also used by tests); returns how many went.
    pub fn evict_ephemeral(&self, pages: u64) -> u64 {
        let mut done = 0;
        while done < pages {
            let want =
                super::pool::Freed::want((pages - done).min(EVICT_BATCH), u64::MAX, u64::MAX);
            let f = self.store.evict_from(self.acct(), want);
            if f.pages == 0 {
                break;
            }
            done += f.pages;
        }
        done
    }
}
