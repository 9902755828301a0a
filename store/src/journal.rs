// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The metadata journal of the crash-safe state: its records, a writer, a
//! reader that skips torn records, and replay into the live metadata.
//!
//! The design is in docs/ARCHITECTURE.md ("Crash-safe state"). A store
//! with a state directory writes a journal per dedup domain (`persist.rs`
//! starts them; the records are written where the store changes what
//! they describe), and `Store::recover` replays them.
//!
//! ```text
//! header  "VTMEMJNL" | version u32 | 0 u32 | epoch u64 | domain u64
//!         | 0 u8 x24 | xxh3-64 of bytes 0..56 (seed 0)        64 bytes
//! record  kind u8 | pool u8 | 0 u16 | client u32                8
//!         | body [24]      object, uuid (16 + 0 x8) or content  32
//!         | a u64          index, reservation total, flags,
//!                          pattern                               40
//!         | tag u64        op records: the request's tag         48
//!         | queue u16 | position u16 | op u8 | has-request u8
//!         | 0 u8 x2                                             56
//!         | xxh3-64 of bytes 0..56, seeded with the epoch       64
//! content body: entry u32 | address u32 | length u16 | form u8 | 0 u8 x13
//! reserve body: answer u64 | opcode u8 (RESERVE or UNRESERVE; 0 without
//!               a request) | 0 u8 x15
//! settled:      queue u16 at 48 | position u16 at 50, the rest zero
//! ```
//!
//! The op records (`NEW_POOL`, `DESTROY_POOL`, `RESERVE`, `RESET`) of an
//! operation a guest request asked for carry the request's queue, ring
//! position, operation index and tag, with has-request 1 (queue 0,
//! position 0 and tag 0 are valid values, so the flag says whether there
//! is a request); records of the store's own operations (a VM removed, an
//! image imported) have none: has-request 0 and bytes 40..54 zero. With
//! the answer the operation got (the pool id of `NEW_POOL`, the `RESERVE`
//! or `UNRESERVE` value, OK for the others), they make the client's
//! pending table ([`Pending`]); a `Settled` record says that a request's
//! answer reached the used ring, and drops its entries.
//!
//! Integers are little-endian. Records are fixed size, so one that was
//! torn or never written (its check fails, or it is all zero) is skipped
//! without losing those after it; seeding the check with the journal's
//! epoch makes a record left by another journal fail too. A record whose
//! check passes but whose contents make no sense (an unknown kind, a page
//! in a pool that does not exist, a length over a page) is corruption, not
//! a crash: reading or replaying stops with an error naming the journal
//! and the record.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};
use vtmem_protocol::{
    ObjectId, Uuid, MAX_POOLS_PER_CLIENT, PAGE_SIZE, POOL_PERSISTENT, POOL_SHARED,
};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::content::ID_MASK;

/// Bytes of the header and of every record.
pub const RECORD_BYTES: usize = 64;
/// First bytes of a journal.
pub const JOURNAL_MAGIC: [u8; 8] = *b"VTMEMJNL";
/// The one version this store writes and reads.
pub const JOURNAL_VERSION: u32 = 1;
/// The content reference of the all-zero page in `Put` records.
pub const ZERO_CONTENT: u32 = ID_MASK;

const CHECKED: usize = RECORD_BYTES - 8;

const K_CONTENT: u8 = 1;
const K_PATTERN: u8 = 2;
const K_MOVE: u8 = 3;
const K_PUT: u8 = 4;
const K_FLUSH_PAGE: u8 = 5;
const K_FLUSH_OBJECT: u8 = 6;
const K_NEW_POOL: u8 = 7;
const K_DESTROY_POOL: u8 = 8;
const K_RESERVE: u8 = 9;
const K_RESET: u8 = 10;
const K_SETTLED: u8 = 11;

/// Opcodes of the non-idempotent operations (docs/protocol.md, section 4),
/// as pending entries and `Reserve` records name them.
pub const OPCODE_NEW_POOL: u8 = 1;
pub const OPCODE_DESTROY_POOL: u8 = 2;
pub const OPCODE_RESERVE: u8 = 7;
pub const OPCODE_UNRESERVE: u8 = 8;
pub const OPCODE_RESET: u8 = 9;

/// How a content's bytes are stored in its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// An LZ4 block that decompresses to one page.
    Lz4,
    /// The page itself.
    Raw,
}

/// The request a non-idempotent operation came in (docs/protocol.md
/// section 8, "Requests offered twice").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OpRef {
    /// The request queue.
    pub queue: u16,
    /// The request's position in the queue's available ring.
    pub position: u16,
    /// The operation's index in the request.
    pub op: u8,
    /// The request header's tag.
    pub tag: u64,
}

/// One journal record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// Content entry `entry` holds `len` bytes in `form` at slab `addr`.
    Content {
        entry: u32,
        addr: u32,
        len: u16,
        form: Form,
    },
    /// Content entry `entry` is the same-filled page of `pattern`.
    Pattern { entry: u32, pattern: u64 },
    /// Compaction moved content entry `entry` to slab `addr`.
    Move { entry: u32, addr: u32 },
    /// A persistent page now references `content` (an entry or
    /// [`ZERO_CONTENT`]); `reserved`: the put spent one page of the pool's
    /// reservation.
    Put {
        client: u32,
        pool: u8,
        object: ObjectId,
        index: u64,
        content: u32,
        reserved: bool,
    },
    /// A persistent page was flushed (or taken by an exclusive get).
    FlushPage {
        client: u32,
        pool: u8,
        object: ObjectId,
        index: u64,
    },
    /// Every page of a persistent pool's object was flushed.
    FlushObject {
        client: u32,
        pool: u8,
        object: ObjectId,
    },
    /// A pool was created with the `NEW_POOL` flags `flags`; `op`: the
    /// request that asked for it (its answer is `pool`).
    NewPool {
        client: u32,
        pool: u8,
        flags: u8,
        uuid: Option<Uuid>,
        op: Option<OpRef>,
    },
    /// A pool was destroyed with its pages and reservation.
    DestroyPool {
        client: u32,
        pool: u8,
        op: Option<OpRef>,
    },
    /// A pool's unspent reservation is now `total` pages. With a request,
    /// `unreserve` says which of `RESERVE` and `UNRESERVE` it was, and
    /// `answer` is its status value (pages granted, or still reserved).
    Reserve {
        client: u32,
        pool: u8,
        total: u64,
        op: Option<OpRef>,
        unreserve: bool,
        answer: u64,
    },
    /// A client was reset: every pool destroyed (and every pending entry).
    Reset { client: u32, op: Option<OpRef> },
    /// The answer of the request at `position` of `queue` is in the used
    /// ring: its pending entries are dropped.
    Settled {
        client: u32,
        queue: u16,
        position: u16,
    },
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn put_object(b: &mut [u8; RECORD_BYTES], object: &ObjectId) {
    for (i, w) in object.0.iter().enumerate() {
        b[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_le_bytes());
    }
}

fn get_object(b: &[u8]) -> ObjectId {
    ObjectId([le64(b, 8), le64(b, 16), le64(b, 24)])
}

fn put_op(b: &mut [u8; RECORD_BYTES], op: &Option<OpRef>) {
    if let Some(op) = op {
        b[40..48].copy_from_slice(&op.tag.to_le_bytes());
        b[48..50].copy_from_slice(&op.queue.to_le_bytes());
        b[50..52].copy_from_slice(&op.position.to_le_bytes());
        b[52] = op.op;
        b[53] = 1;
    }
}

fn get_op(b: &[u8]) -> Result<Option<OpRef>, String> {
    match b[53] {
        0 if b[40..53].iter().all(|&x| x == 0) => Ok(None),
        0 => Err("a request reference without its flag".into()),
        1 => Ok(Some(OpRef {
            tag: le64(b, 40),
            queue: le16(b, 48),
            position: le16(b, 50),
            op: b[52],
        })),
        f => Err(format!("request flag {f}")),
    }
}

impl Record {
    /// The record's bytes, checked with `epoch`.
    pub fn encode(&self, epoch: u64) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        let (kind, client, pool) = match *self {
            Record::Content {
                entry,
                addr,
                len,
                form,
            } => {
                b[8..12].copy_from_slice(&entry.to_le_bytes());
                b[12..16].copy_from_slice(&addr.to_le_bytes());
                b[16..18].copy_from_slice(&len.to_le_bytes());
                b[18] = match form {
                    Form::Lz4 => 0,
                    Form::Raw => 1,
                };
                (K_CONTENT, 0, 0)
            }
            Record::Pattern { entry, pattern } => {
                b[8..12].copy_from_slice(&entry.to_le_bytes());
                b[32..40].copy_from_slice(&pattern.to_le_bytes());
                (K_PATTERN, 0, 0)
            }
            Record::Move { entry, addr } => {
                b[8..12].copy_from_slice(&entry.to_le_bytes());
                b[12..16].copy_from_slice(&addr.to_le_bytes());
                (K_MOVE, 0, 0)
            }
            Record::Put {
                client,
                pool,
                object,
                index,
                content,
                reserved,
            } => {
                put_object(&mut b, &object);
                b[32..40].copy_from_slice(&index.to_le_bytes());
                b[40..44].copy_from_slice(&content.to_le_bytes());
                b[44] = u8::from(reserved);
                (K_PUT, client, pool)
            }
            Record::FlushPage {
                client,
                pool,
                object,
                index,
            } => {
                put_object(&mut b, &object);
                b[32..40].copy_from_slice(&index.to_le_bytes());
                (K_FLUSH_PAGE, client, pool)
            }
            Record::FlushObject {
                client,
                pool,
                object,
            } => {
                put_object(&mut b, &object);
                (K_FLUSH_OBJECT, client, pool)
            }
            Record::NewPool {
                client,
                pool,
                flags,
                uuid,
                op,
            } => {
                if let Some(u) = uuid {
                    b[8..24].copy_from_slice(u.as_bytes());
                }
                b[32] = flags;
                put_op(&mut b, &op);
                (K_NEW_POOL, client, pool)
            }
            Record::DestroyPool { client, pool, op } => {
                put_op(&mut b, &op);
                (K_DESTROY_POOL, client, pool)
            }
            Record::Reserve {
                client,
                pool,
                total,
                op,
                unreserve,
                answer,
            } => {
                if op.is_some() {
                    b[8..16].copy_from_slice(&answer.to_le_bytes());
                    b[16] = if unreserve {
                        OPCODE_UNRESERVE
                    } else {
                        OPCODE_RESERVE
                    };
                }
                b[32..40].copy_from_slice(&total.to_le_bytes());
                put_op(&mut b, &op);
                (K_RESERVE, client, pool)
            }
            Record::Reset { client, op } => {
                put_op(&mut b, &op);
                (K_RESET, client, 0)
            }
            Record::Settled {
                client,
                queue,
                position,
            } => {
                b[48..50].copy_from_slice(&queue.to_le_bytes());
                b[50..52].copy_from_slice(&position.to_le_bytes());
                (K_SETTLED, client, 0)
            }
        };
        b[0] = kind;
        b[1] = pool;
        b[4..8].copy_from_slice(&client.to_le_bytes());
        let check = xxh3_64_with_seed(&b[..CHECKED], epoch);
        b[CHECKED..].copy_from_slice(&check.to_le_bytes());
        b
    }

    /// Reads a record: `Ok(None)` if it fails its check (torn, unwritten
    /// or another journal's), an error if it passes and makes no sense.
    pub fn decode(b: &[u8; RECORD_BYTES], epoch: u64) -> Result<Option<Record>, String> {
        if le64(b, CHECKED) != xxh3_64_with_seed(&b[..CHECKED], epoch) || b[0] == 0 {
            return Ok(None);
        }
        let client = le32(b, 4);
        let pool = b[1];
        let body_entry = || le32(b, 8);
        let r = match b[0] {
            K_CONTENT => {
                let len = le16(b, 16);
                let form = match b[18] {
                    0 => Form::Lz4,
                    1 => Form::Raw,
                    f => return Err(format!("content of unknown form {f}")),
                };
                if len == 0 || usize::from(len) > PAGE_SIZE {
                    return Err(format!("content of {len} bytes"));
                }
                if form == Form::Raw && usize::from(len) != PAGE_SIZE {
                    return Err(format!("raw content of {len} bytes, not a page"));
                }
                Record::Content {
                    entry: body_entry(),
                    addr: le32(b, 12),
                    len,
                    form,
                }
            }
            K_PATTERN => Record::Pattern {
                entry: body_entry(),
                pattern: le64(b, 32),
            },
            K_MOVE => Record::Move {
                entry: body_entry(),
                addr: le32(b, 12),
            },
            K_PUT => Record::Put {
                client,
                pool,
                object: get_object(b),
                index: le64(b, 32),
                content: le32(b, 40),
                reserved: match b[44] {
                    0 => false,
                    1 => true,
                    f => return Err(format!("put with reserved flag {f}")),
                },
            },
            K_FLUSH_PAGE => Record::FlushPage {
                client,
                pool,
                object: get_object(b),
                index: le64(b, 32),
            },
            K_FLUSH_OBJECT => Record::FlushObject {
                client,
                pool,
                object: get_object(b),
            },
            K_NEW_POOL => {
                let mut u = [0u8; 16];
                u.copy_from_slice(&b[8..24]);
                let uuid = if u == [0; 16] {
                    None
                } else {
                    Some(Uuid::from_bytes(u).ok_or("pool with an invalid uuid")?)
                };
                Record::NewPool {
                    client,
                    pool,
                    flags: b[32],
                    uuid,
                    op: get_op(b)?,
                }
            }
            K_DESTROY_POOL => Record::DestroyPool {
                client,
                pool,
                op: get_op(b)?,
            },
            K_RESERVE => {
                let op = get_op(b)?;
                let unreserve = match (op.is_some(), b[16]) {
                    (false, 0) => false,
                    (true, OPCODE_RESERVE) => false,
                    (true, OPCODE_UNRESERVE) => true,
                    (_, o) => return Err(format!("reservation of opcode {o}")),
                };
                Record::Reserve {
                    client,
                    pool,
                    total: le64(b, 32),
                    op,
                    unreserve,
                    answer: le64(b, 8),
                }
            }
            K_RESET => Record::Reset {
                client,
                op: get_op(b)?,
            },
            K_SETTLED => Record::Settled {
                client,
                queue: le16(b, 48),
                position: le16(b, 50),
            },
            k => return Err(format!("unknown record kind {k}")),
        };
        Ok(Some(r))
    }
}

/// Why a journal could not be written, read or replayed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("journal {0}: not a vtmem journal (bad magic)")]
    BadMagic(PathBuf),
    #[error(
        "journal {0}: version {1} is not supported (this store reads version {JOURNAL_VERSION})"
    )]
    Version(PathBuf, u32),
    #[error("journal {0}: the header fails its checksum")]
    BadHeader(PathBuf),
    #[error("journal {0}: full ({1} bytes); a checkpoint is due")]
    Full(PathBuf, u64),
    #[error("journal {0}: no room on its file system for more records: {1}")]
    NoRoom(PathBuf, io::Error),
    #[error("journal {0}: {1} bytes, shorter than its header")]
    Truncated(PathBuf, u64),
    #[error("journal {0}: record {1}: {2}")]
    Record(PathBuf, u64, String),
}

fn header(epoch: u64, domain: u64) -> [u8; RECORD_BYTES] {
    let mut b = [0u8; RECORD_BYTES];
    b[..8].copy_from_slice(&JOURNAL_MAGIC);
    b[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&epoch.to_le_bytes());
    b[24..32].copy_from_slice(&domain.to_le_bytes());
    let check = xxh3_64_with_seed(&b[..CHECKED], 0);
    b[CHECKED..].copy_from_slice(&check.to_le_bytes());
    b
}

/// A journal being written: the file mapped `MAP_SHARED`, so that an
/// append is a copy of 64 bytes into the page cache (a `pwrite` per record
/// would cost about a microsecond, a fifth of a put). The file is created
/// at its full capacity, sparse: memory is taken only as records are
/// written. Appends from many threads run in parallel: each takes its
/// record's place with an atomic add to the tail, so the journal's order
/// is the order in which places were taken, and an append that returned
/// is complete: in the page cache, which outlives the process on a tmpfs.
///
/// The journal must be in a state directory this process holds (see
/// `state.rs`, "Trust boundary"): a process that truncated the file under
/// the mapping would raise SIGBUS in the next append.
#[derive(Debug)]
pub struct JournalWriter {
    path: PathBuf,
    /// Kept open with the mapping; places are allocated through it.
    file: File,
    base: NonNull<u8>,
    /// Bytes mapped, header included.
    capacity: u64,
    epoch: u64,
    tail: AtomicU64,
    /// Bytes from the start that are allocated on the file system, so
    /// that writing them through the mapping cannot fail: the file is
    /// sparse, and a write to a hole its file system cannot fill (a full
    /// tmpfs) would kill the process with SIGBUS. Grown ahead of the tail
    /// by [`ALLOCATE_STEP`], under `grow`.
    allocated: AtomicU64,
    grow: Mutex<()>,
}

/// Bytes a journal's allocation grows by (4096 records).
pub const ALLOCATE_STEP: u64 = 4096 * RECORD_BYTES as u64;

// SAFETY: appends write disjoint places of the mapping (each is taken once,
// by the atomic add), and nothing reads the mapping: it may be used from
// any thread, by many at once.
unsafe impl Send for JournalWriter {}
// SAFETY: as for `Send`.
unsafe impl Sync for JournalWriter {}

impl JournalWriter {
    /// Creates the journal `path` (which must not exist; mode 0600) with a
    /// header naming `epoch` and `domain`, and room for `records` records.
    pub fn create(
        path: &Path,
        epoch: u64,
        domain: u64,
        records: u64,
    ) -> Result<JournalWriter, JournalError> {
        let io = |e| JournalError::Io(path.to_path_buf(), e);
        let capacity = records
            .checked_add(1)
            .and_then(|n| n.checked_mul(RECORD_BYTES as u64))
            .filter(|&c| usize::try_from(c).is_ok())
            .ok_or_else(|| io(io::Error::other(format!("{records} records is too many"))))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.set_len(capacity).map_err(io)?;
        file.write_all_at(&header(epoch, domain), 0).map_err(io)?;
        // SAFETY: a new mapping chosen by the kernel (no address hint)
        // overlaps nothing of ours; the file was just made `capacity` bytes
        // long, and the trust boundary keeps it so while it is mapped.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                capacity as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &file,
                0,
            )
        }
        .map_err(|e| io(e.into()))?;
        let base = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io(io::Error::other("mmap returned null")))?;
        let w = JournalWriter {
            path: path.to_path_buf(),
            file,
            base,
            capacity,
            epoch,
            tail: AtomicU64::new(RECORD_BYTES as u64),
            allocated: AtomicU64::new(0),
            grow: Mutex::new(()),
        };
        w.allocate_to(ALLOCATE_STEP)?;
        Ok(w)
    }

    /// Allocates the file's first `to` bytes (at most its capacity), and
    /// [`ALLOCATE_STEP`] more if it must grow at all.
    fn allocate_to(&self, to: u64) -> Result<(), JournalError> {
        if to <= self.allocated.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self.grow.lock();
        let have = self.allocated.load(Ordering::Acquire);
        if to <= have {
            return Ok(());
        }
        let want = to.max(have + ALLOCATE_STEP).min(self.capacity);
        super::state::allocate(&self.file, &self.path, have, want - have)
            .map_err(|e| JournalError::NoRoom(self.path.clone(), e))?;
        self.allocated.store(want, Ordering::Release);
        Ok(())
    }

    /// Makes sure the next `records` places are allocated (see
    /// `allocated`); an error if the file system has no room for them.
    pub fn allocate_ahead(&self, records: u64) -> Result<(), JournalError> {
        let tail = self.tail.load(Ordering::Relaxed);
        self.allocate_to(tail.saturating_add(records.saturating_mul(RECORD_BYTES as u64)))
    }

    /// Places allocated past the tail.
    pub fn allocated_ahead(&self) -> u64 {
        let tail = self.tail.load(Ordering::Relaxed);
        self.allocated.load(Ordering::Acquire).saturating_sub(tail) / RECORD_BYTES as u64
    }

    /// The journal's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The journal's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes taken so far, header included.
    pub fn len(&self) -> u64 {
        self.tail.load(Ordering::Relaxed).min(self.capacity)
    }

    /// Bytes mapped, header included: where appends stop.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether no record has been appended.
    pub fn is_empty(&self) -> bool {
        self.len() == RECORD_BYTES as u64
    }

    /// Appends `r`; returns its record number once it is written. A full
    /// journal refuses every further append (a checkpoint is due).
    pub fn append(&self, r: &Record) -> Result<u64, JournalError> {
        let at = self.tail.fetch_add(RECORD_BYTES as u64, Ordering::Relaxed);
        if at + RECORD_BYTES as u64 > self.capacity {
            return Err(JournalError::Full(self.path.clone(), self.capacity));
        }
        // Never a write to a place the file system may not be able to
        // fill: the record is refused instead (a lost record, as in a
        // full journal).
        self.allocate_to(at + RECORD_BYTES as u64)?;
        let rec = r.encode(self.epoch);
        // SAFETY: `at + RECORD_BYTES <= capacity` (checked above), so the
        // place lies inside the mapping.
        let dst = unsafe { self.base.as_ptr().add(at as usize) };
        // SAFETY: `dst` starts RECORD_BYTES of the live mapping that no
        // other append writes (the atomic add gave this place to this call
        // alone) and that nothing reads; `rec` is a local array.
        unsafe { std::ptr::copy_nonoverlapping(rec.as_ptr(), dst, RECORD_BYTES) };
        Ok(at / RECORD_BYTES as u64 - 1)
    }
}

impl Drop for JournalWriter {
    fn drop(&mut self) {
        // SAFETY: `base` and `capacity` are those of the mapping made in
        // `create`, which nothing else reaches.
        if let Err(e) = unsafe { munmap(self.base.as_ptr().cast(), self.capacity as usize) } {
            log::warn!("journal {}: munmap: {e}", self.path.display());
        }
    }
}

/// A journal as read back.
#[derive(Debug, Default)]
pub struct Scanned {
    /// The header's epoch and domain.
    pub epoch: u64,
    pub domain: u64,
    /// The valid records with their record numbers, in journal order.
    pub records: Vec<(u64, Record)>,
    /// Record places skipped: torn, never written, or another journal's.
    pub skipped: u64,
    /// Bytes after the last whole record (a record cut short).
    pub partial: u64,
}

/// Reads the journal at `path`. A journal is created at its full
/// capacity, sparse: only what lies before the end of its last data is
/// read (the places in the hole after it were never written, and are not
/// counted as skipped).
pub fn read_journal(path: &Path) -> Result<Scanned, JournalError> {
    use rustix::fs::{seek, SeekFrom};
    let io = |e| JournalError::Io(path.to_path_buf(), e);
    let f = File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    // The end of the last data (a file system without SEEK_DATA reads it
    // all).
    let mut end = 0u64;
    let mut pos = 0u64;
    let mut exact = true;
    while pos < len {
        match seek(&f, SeekFrom::Data(pos)) {
            Ok(data) => match seek(&f, SeekFrom::Hole(data)) {
                Ok(hole) if hole > data => {
                    end = hole.min(len);
                    pos = hole;
                }
                _ => {
                    exact = false;
                    break;
                }
            },
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => {
                exact = false;
                break;
            }
        }
    }
    if !exact {
        end = len;
    }
    // Whole places only past the header; a journal shorter than its
    // header is read whole (and refused).
    let end = if end < len {
        end.div_ceil(RECORD_BYTES as u64) * RECORD_BYTES as u64
    } else {
        len
    }
    .max(len.min(RECORD_BYTES as u64))
    .min(len);
    let mut bytes = vec![0u8; end as usize];
    f.read_exact_at(&mut bytes, 0).map_err(io)?;
    scan(path, &bytes)
}

/// Reads a journal's bytes; `path` names it in errors.
pub fn scan(path: &Path, bytes: &[u8]) -> Result<Scanned, JournalError> {
    let mut places = bytes.chunks_exact(RECORD_BYTES);
    let partial = places.remainder().len() as u64;
    let Some(h) = places.next() else {
        return Err(JournalError::Truncated(
            path.to_path_buf(),
            bytes.len() as u64,
        ));
    };
    if h[..8] != JOURNAL_MAGIC {
        return Err(JournalError::BadMagic(path.to_path_buf()));
    }
    if le64(h, CHECKED) != xxh3_64_with_seed(&h[..CHECKED], 0) {
        return Err(JournalError::BadHeader(path.to_path_buf()));
    }
    let version = le32(h, 8);
    if version != JOURNAL_VERSION {
        return Err(JournalError::Version(path.to_path_buf(), version));
    }
    let mut out = Scanned {
        epoch: le64(h, 16),
        domain: le64(h, 24),
        partial,
        ..Default::default()
    };
    for (n, place) in places.enumerate() {
        let mut b = [0u8; RECORD_BYTES];
        b.copy_from_slice(place);
        match Record::decode(&b, out.epoch) {
            Ok(Some(r)) => out.records.push((n as u64, r)),
            Ok(None) => out.skipped += 1,
            Err(what) => return Err(JournalError::Record(path.to_path_buf(), n as u64, what)),
        }
    }
    Ok(out)
}

/// Where a content entry's bytes are, or its pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stored {
    /// `len` bytes in `form` at slab address `addr`.
    Slot { addr: u32, len: u16, form: Form },
    /// A same-filled page.
    Pattern(u64),
}

/// A pool as replayed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayedPool {
    /// Its `NEW_POOL` flags.
    pub flags: u8,
    pub uuid: Option<Uuid>,
    /// Unspent reservation, in pages.
    pub reserved: u64,
    /// Persistent pages: handle to content entry (or [`ZERO_CONTENT`]).
    pub pages: BTreeMap<(ObjectId, u64), u32>,
}

/// Where a pending entry is: the request's queue and ring position, and
/// the operation's index in the request.
pub type PendingKey = (u16, u16, u8);

/// A non-idempotent operation whose request is not known to be answered
/// (docs/protocol.md section 8, "Requests offered twice"): what a request
/// offered again at its place must ask to be answered from it, and the
/// answer. Only operations that succeeded have one (a failed one changed
/// nothing and may run again), so the answer's status is OK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    /// The request header's tag.
    pub tag: u64,
    /// The operation's opcode (`OPCODE_*`).
    pub opcode: u8,
    /// What it named: the `NEW_POOL` flags, the pool id of the others
    /// (0 for `RESET`).
    pub asked: u8,
    /// The status value it was answered: the pool id of `NEW_POOL`, the
    /// pages granted by `RESERVE` or still reserved after `UNRESERVE`, 0.
    pub value: u64,
}

/// Each client's pending table, by durable number.
pub type PendingTables = BTreeMap<u32, BTreeMap<PendingKey, Pending>>;

impl Record {
    /// The pending entry an op record makes, with its client and key
    /// (none for records of other kinds or without a request).
    pub fn pending(&self) -> Option<(u32, PendingKey, Pending)> {
        let (client, op, opcode, asked, value) = match *self {
            Record::NewPool {
                client,
                pool,
                flags,
                op: Some(op),
                ..
            } => (client, op, OPCODE_NEW_POOL, flags, u64::from(pool)),
            Record::DestroyPool {
                client,
                pool,
                op: Some(op),
            } => (client, op, OPCODE_DESTROY_POOL, pool, 0),
            Record::Reserve {
                client,
                pool,
                op: Some(op),
                unreserve,
                answer,
                ..
            } => {
                let opcode = if unreserve {
                    OPCODE_UNRESERVE
                } else {
                    OPCODE_RESERVE
                };
                (client, op, opcode, pool, answer)
            }
            Record::Reset {
                client,
                op: Some(op),
            } => (client, op, OPCODE_RESET, 0, 0),
            _ => return None,
        };
        Some((
            client,
            (op.queue, op.position, op.op),
            Pending {
                tag: op.tag,
                opcode,
                asked,
                value,
            },
        ))
    }
}

/// Applies `r` to the pending tables: an op record with a request adds
/// its entry (replacing one at its key), a reset first drops every entry
/// of its client, a `Settled` record drops the entries of its request.
pub fn apply_pending(tables: &mut PendingTables, r: &Record) {
    match *r {
        Record::Reset { client, .. } => {
            tables.remove(&client);
        }
        Record::Settled {
            client,
            queue,
            position,
        } => {
            if let Some(t) = tables.get_mut(&client) {
                t.retain(|&(q, p, _), _| (q, p) != (queue, position));
                if t.is_empty() {
                    tables.remove(&client);
                }
            }
            return;
        }
        _ => {}
    }
    if let Some((client, key, p)) = r.pending() {
        tables.entry(client).or_default().insert(key, p);
    }
}

/// A domain's metadata as replayed: what recovery adopts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Clients by durable number, their pools by id.
    pub clients: Clients,
    /// Content entries that some page references, with where they are.
    /// Entries no page references are left out: their slots are free.
    pub contents: HashMap<u32, Stored>,
    /// Each client's pending table (see [`Pending`]).
    pub pending: PendingTables,
}

/// Replayed clients by durable number, their pools by id.
pub type Clients = BTreeMap<u32, BTreeMap<u8, ReplayedPool>>;

fn add_ref(refs: &mut HashMap<u32, u32>, c: u32) {
    if c != ZERO_CONTENT {
        *refs.entry(c).or_default() += 1;
    }
}

fn drop_ref(refs: &mut HashMap<u32, u32>, c: u32) {
    if let std::collections::hash_map::Entry::Occupied(mut e) = refs.entry(c) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

/// Pool `pool` of `client`, or an error for record `n` of `path`.
fn pool_of<'a>(
    clients: &'a mut Clients,
    client: u32,
    pool: u8,
    path: &Path,
    n: u64,
) -> Result<&'a mut ReplayedPool, JournalError> {
    clients
        .get_mut(&client)
        .and_then(|c| c.get_mut(&pool))
        .ok_or_else(|| {
            JournalError::Record(
                path.to_path_buf(),
                n,
                format!("pool {pool} of client {client} does not exist"),
            )
        })
}

/// Replays a journal's records (as [`scan`] returns them) in order onto
/// `base` (the checkpoint the journal follows, or nothing); `path` names
/// the journal in errors. A record that cannot follow the
/// ones before it in a journal this store wrote (a page of a pool that
/// does not exist or is not persistent, a reference to an unknown entry)
/// is an error.
pub fn replay(
    path: &Path,
    base: Replayed,
    records: &[(u64, Record)],
) -> Result<Replayed, JournalError> {
    let Replayed {
        mut clients,
        mut contents,
        mut pending,
    } = base;
    // Persistent pages referencing each entry: an entry is only defined
    // again once none does (rule 3), so a redefinition of one still
    // referenced is a journal this store cannot have written.
    let mut refs: HashMap<u32, u32> = HashMap::new();
    for pools in clients.values() {
        for p in pools.values() {
            for &c in p.pages.values() {
                add_ref(&mut refs, c);
            }
        }
    }
    for &(n, r) in records {
        apply_pending(&mut pending, &r);
        let bad = |what: String| JournalError::Record(path.to_path_buf(), n, what);
        let persistent = |p: &ReplayedPool| -> Result<(), JournalError> {
            if p.flags & POOL_PERSISTENT == 0 {
                return Err(bad("a page record for an ephemeral pool".into()));
            }
            Ok(())
        };
        match r {
            Record::Content {
                entry,
                addr,
                len,
                form,
            } => {
                if entry >= ZERO_CONTENT {
                    return Err(bad(format!("content entry {entry} out of range")));
                }
                if refs.contains_key(&entry) {
                    return Err(bad(format!(
                        "content entry {entry} defined again while pages reference it"
                    )));
                }
                contents.insert(entry, Stored::Slot { addr, len, form });
            }
            Record::Pattern { entry, pattern } => {
                if entry >= ZERO_CONTENT {
                    return Err(bad(format!("content entry {entry} out of range")));
                }
                if refs.contains_key(&entry) {
                    return Err(bad(format!(
                        "content entry {entry} defined again while pages reference it"
                    )));
                }
                contents.insert(entry, Stored::Pattern(pattern));
            }
            Record::Move { entry, addr } => match contents.get_mut(&entry) {
                Some(Stored::Slot { addr: a, .. }) => *a = addr,
                _ => return Err(bad(format!("move of content entry {entry}, not in a slot"))),
            },
            Record::Put {
                client,
                pool,
                object,
                index,
                content,
                reserved,
            } => {
                if content != ZERO_CONTENT && !contents.contains_key(&content) {
                    return Err(bad(format!("page of unknown content entry {content}")));
                }
                let p = pool_of(&mut clients, client, pool, path, n)?;
                persistent(p)?;
                if reserved {
                    // The last RESERVE counted it as unspent.
                    p.reserved = p.reserved.saturating_sub(1);
                }
                if let Some(old) = p.pages.insert((object, index), content) {
                    drop_ref(&mut refs, old);
                }
                add_ref(&mut refs, content);
            }
            Record::FlushPage {
                client,
                pool,
                object,
                index,
            } => {
                let p = pool_of(&mut clients, client, pool, path, n)?;
                persistent(p)?;
                if let Some(old) = p.pages.remove(&(object, index)) {
                    drop_ref(&mut refs, old);
                }
            }
            Record::FlushObject {
                client,
                pool,
                object,
            } => {
                let p = pool_of(&mut clients, client, pool, path, n)?;
                persistent(p)?;
                p.pages.retain(|(o, _), c| {
                    let keep = *o != object;
                    if !keep {
                        drop_ref(&mut refs, *c);
                    }
                    keep
                });
            }
            Record::NewPool {
                client,
                pool,
                flags,
                uuid,
                ..
            } => {
                if u32::from(pool) >= MAX_POOLS_PER_CLIENT {
                    return Err(bad(format!("pool id {pool} out of range")));
                }
                if (flags & POOL_SHARED != 0) != uuid.is_some() {
                    return Err(bad("a shared pool without a uuid, or the reverse".into()));
                }
                let c = clients.entry(client).or_default();
                if c.contains_key(&pool) {
                    return Err(bad(format!("pool {pool} of client {client} created twice")));
                }
                c.insert(
                    pool,
                    ReplayedPool {
                        flags,
                        uuid,
                        ..Default::default()
                    },
                );
            }
            Record::DestroyPool { client, pool, .. } => {
                pool_of(&mut clients, client, pool, path, n)?;
                if let Some(p) = clients.get_mut(&client).and_then(|c| c.remove(&pool)) {
                    for c in p.pages.into_values() {
                        drop_ref(&mut refs, c);
                    }
                }
            }
            Record::Reserve {
                client,
                pool,
                total,
                ..
            } => {
                let p = pool_of(&mut clients, client, pool, path, n)?;
                persistent(p)?;
                p.reserved = total;
            }
            Record::Settled { .. } => {}
            Record::Reset { client, .. } => {
                for p in std::mem::take(clients.entry(client).or_default()).into_values() {
                    for c in p.pages.into_values() {
                        drop_ref(&mut refs, c);
                    }
                }
            }
        }
    }
    // Only what a page references survives; the rest is free space.
    let mut live: HashMap<u32, Stored> = HashMap::new();
    for pools in clients.values() {
        for p in pools.values() {
            for &c in p.pages.values() {
                if c != ZERO_CONTENT {
                    if let Some(s) = contents.get(&c) {
                        live.insert(c, *s);
                    }
                }
            }
        }
    }
    Ok(Replayed {
        clients,
        contents: live,
        pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: u64 = 0x1234_5678_9abc_def0;

    fn op(position: u16) -> Option<OpRef> {
        Some(OpRef {
            queue: 1,
            position,
            op: 2,
            tag: 0xfeed,
        })
    }

    fn object(n: u64) -> ObjectId {
        ObjectId([n, 0, 7])
    }

    /// One record of every kind, in an order replay accepts.
    fn every_kind() -> Vec<Record> {
        vec![
            Record::NewPool {
                client: 3,
                pool: 0,
                flags: POOL_PERSISTENT,
                uuid: None,
                op: op(1),
            },
            Record::NewPool {
                client: 3,
                pool: 1,
                flags: POOL_SHARED,
                uuid: Uuid::from_bytes([9; 16]),
                op: op(2),
            },
            Record::Content {
                entry: 5,
                addr: 0x0400_0001,
                len: 1234,
                form: Form::Lz4,
            },
            Record::Content {
                entry: 6,
                addr: 77,
                len: PAGE_SIZE as u16,
                form: Form::Raw,
            },
            Record::Pattern {
                entry: 8,
                pattern: 0xdead_beef_dead_beef,
            },
            Record::Move { entry: 5, addr: 9 },
            Record::Put {
                client: 3,
                pool: 0,
                object: object(1),
                index: 4,
                content: 5,
                reserved: false,
            },
            Record::Put {
                client: 3,
                pool: 0,
                object: object(1),
                index: 5,
                content: ZERO_CONTENT,
                reserved: false,
            },
            Record::Put {
                client: 3,
                pool: 0,
                object: object(2),
                index: 0,
                content: 6,
                reserved: false,
            },
            Record::FlushPage {
                client: 3,
                pool: 0,
                object: object(1),
                index: 5,
            },
            Record::FlushObject {
                client: 3,
                pool: 0,
                object: object(2),
            },
            Record::Reserve {
                client: 3,
                pool: 0,
                total: 12,
                op: op(3),
                unreserve: false,
                answer: 12,
            },
            Record::Reserve {
                client: 3,
                pool: 0,
                total: 12,
                op: None,
                unreserve: false,
                answer: 0,
            },
            Record::Settled {
                client: 3,
                queue: 1,
                position: 2,
            },
            Record::DestroyPool {
                client: 3,
                pool: 1,
                op: op(4),
            },
            Record::Reset {
                client: 4,
                op: op(5),
            },
        ]
    }

    fn journal(records: &[Record]) -> Vec<u8> {
        let mut b = header(EPOCH, 1).to_vec();
        for r in records {
            b.extend_from_slice(&r.encode(EPOCH));
        }
        b
    }

    fn fs_len(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().len()
    }

    fn path() -> &'static Path {
        Path::new("/state/d1.journal")
    }

    #[test]
    fn every_kind_round_trips_and_replays() {
        let rs = every_kind();
        let s = scan(path(), &journal(&rs)).unwrap();
        assert_eq!(s.epoch, EPOCH);
        assert_eq!(s.domain, 1);
        assert_eq!((s.skipped, s.partial), (0, 0));
        let got: Vec<Record> = s.records.iter().map(|(_, r)| *r).collect();
        assert_eq!(got, rs);
        let r = replay(path(), Replayed::default(), &s.records).unwrap();
        let pools = &r.clients[&3];
        assert_eq!(pools.len(), 1, "pool 1 was destroyed");
        let p = &pools[&0];
        assert_eq!(p.reserved, 12);
        assert_eq!(p.pages.len(), 1);
        assert_eq!(p.pages[&(object(1), 4)], 5);
        assert!(r.clients[&4].is_empty());
        // Only referenced content survives, at its moved address.
        assert_eq!(r.contents.len(), 1);
        assert_eq!(
            r.contents[&5],
            Stored::Slot {
                addr: 9,
                len: 1234,
                form: Form::Lz4
            }
        );
        // Pending: the first pool's (position 1), the reservation's and
        // the destruction's; the second pool's was settled, client 4's
        // reset is its own.
        let keys: Vec<PendingKey> = r.pending[&3].keys().copied().collect();
        assert_eq!(keys, vec![(1, 1, 2), (1, 3, 2), (1, 4, 2)]);
        assert_eq!(
            r.pending[&3][&(1, 3, 2)],
            Pending {
                tag: 0xfeed,
                opcode: OPCODE_RESERVE,
                asked: 0,
                value: 12
            }
        );
        assert_eq!(r.pending[&3][&(1, 1, 2)].value, 0);
        assert_eq!(r.pending[&3][&(1, 1, 2)].asked, POOL_PERSISTENT);
        assert_eq!(r.pending[&4].len(), 1);
        assert_eq!(r.pending[&4][&(1, 5, 2)].opcode, OPCODE_RESET);
    }

    #[test]
    fn torn_records_are_skipped_and_those_after_them_kept() {
        let rs = every_kind();
        let mut b = journal(&rs);
        // Record 2 torn: its second half never written.
        let at = RECORD_BYTES * 3;
        b[at + 32..at + 64].fill(0);
        let s = scan(path(), &b).unwrap();
        assert_eq!(s.skipped, 1);
        assert_eq!(s.records.len(), rs.len() - 1);
        assert!(s.records.iter().all(|(n, _)| *n != 2));
        // A single flipped bit anywhere fails the check too.
        for bit in 0..RECORD_BYTES * 8 {
            let mut one = journal(&rs[..1]);
            one[RECORD_BYTES + bit / 8] ^= 1 << (bit % 8);
            let s = scan(path(), &one).unwrap();
            assert_eq!((s.records.len(), s.skipped), (0, 1), "bit {bit}");
        }
    }

    #[test]
    fn unwritten_garbage_and_cut_short_records_are_skipped() {
        let rs = every_kind();
        let mut b = journal(&rs);
        b.extend_from_slice(&[0u8; RECORD_BYTES * 3]);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..RECORD_BYTES * 2 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.push(x as u8);
        }
        b.extend_from_slice(&rs[0].encode(EPOCH)[..40]);
        let s = scan(path(), &b).unwrap();
        assert_eq!(s.records.len(), rs.len());
        assert_eq!(s.skipped, 5);
        assert_eq!(s.partial, 40);
    }

    #[test]
    fn another_journals_records_fail_their_check() {
        let mut b = journal(&[]);
        b.extend_from_slice(&every_kind()[0].encode(EPOCH + 1));
        let s = scan(path(), &b).unwrap();
        assert_eq!((s.records.len(), s.skipped), (0, 1));
    }

    #[test]
    fn a_sparse_journal_is_read_up_to_its_data() {
        let top = tempfile::tempdir().unwrap();
        let p = top.path().join("d1.journal.0");
        let w = JournalWriter::create(&p, EPOCH, 1, 1 << 20).unwrap();
        let rs = every_kind();
        for r in &rs {
            w.append(r).unwrap();
        }
        drop(w);
        assert_eq!(fs_len(&p), (1 + (1 << 20)) * RECORD_BYTES as u64);
        let s = read_journal(&p).unwrap();
        let got: Vec<Record> = s.records.iter().map(|(_, r)| *r).collect();
        assert_eq!(got, rs);
        // The rest of the page the records are in is read, not the hole.
        assert!(s.skipped < 4096 / RECORD_BYTES as u64, "{}", s.skipped);
        assert_eq!(s.partial, 0);
    }

    #[test]
    fn a_bad_header_is_an_error_naming_the_file() {
        let good = journal(&every_kind());
        let err = |b: &[u8]| scan(path(), b).unwrap_err().to_string();
        assert_eq!(
            err(&good[..10]),
            "journal /state/d1.journal: 10 bytes, shorter than its header"
        );
        assert_eq!(
            err(&[]),
            "journal /state/d1.journal: 0 bytes, shorter than its header"
        );
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(
            err(&b),
            "journal /state/d1.journal: not a vtmem journal (bad magic)"
        );
        let mut b = good.clone();
        b[20] ^= 1;
        assert_eq!(
            err(&b),
            "journal /state/d1.journal: the header fails its checksum"
        );
        let mut h = [0u8; RECORD_BYTES];
        h[..8].copy_from_slice(&JOURNAL_MAGIC);
        h[8..12].copy_from_slice(&2u32.to_le_bytes());
        let check = xxh3_64_with_seed(&h[..CHECKED], 0);
        h[CHECKED..].copy_from_slice(&check.to_le_bytes());
        assert_eq!(
            err(&h),
            "journal /state/d1.journal: version 2 is not supported (this store reads version 1)"
        );
    }

    /// A record whose check passes but whose contents are wrong (a bug or
    /// a forged file) is an error, never a panic.
    #[test]
    fn checked_nonsense_is_an_error_naming_the_record() {
        let forge = |f: &dyn Fn(&mut [u8; RECORD_BYTES])| {
            let mut r = every_kind()[2].encode(EPOCH);
            f(&mut r);
            let check = xxh3_64_with_seed(&r[..CHECKED], EPOCH);
            r[CHECKED..].copy_from_slice(&check.to_le_bytes());
            let mut b = journal(&every_kind()[..1]);
            b.extend_from_slice(&r);
            scan(path(), &b).unwrap_err().to_string()
        };
        assert_eq!(
            forge(&|r| r[0] = 99),
            "journal /state/d1.journal: record 1: unknown record kind 99"
        );
        assert_eq!(
            forge(&|r| r[16..18].copy_from_slice(&5000u16.to_le_bytes())),
            "journal /state/d1.journal: record 1: content of 5000 bytes"
        );
        assert_eq!(
            forge(&|r| r[16..18].copy_from_slice(&0u16.to_le_bytes())),
            "journal /state/d1.journal: record 1: content of 0 bytes"
        );
        assert_eq!(
            forge(&|r| r[18] = 1),
            "journal /state/d1.journal: record 1: raw content of 1234 bytes, not a page"
        );
        assert_eq!(
            forge(&|r| r[18] = 7),
            "journal /state/d1.journal: record 1: content of unknown form 7"
        );
    }

    /// The request flag says whether there is a request: queue, position
    /// and tag 0 are one; request bytes without the flag are not.
    #[test]
    fn a_request_is_marked_and_checked() {
        let forge = |r: &Record, f: &dyn Fn(&mut [u8; RECORD_BYTES])| {
            let mut b = r.encode(EPOCH);
            f(&mut b);
            let check = xxh3_64_with_seed(&b[..CHECKED], EPOCH);
            b[CHECKED..].copy_from_slice(&check.to_le_bytes());
            Record::decode(&b, EPOCH)
        };
        let zero = Record::Reset {
            client: 1,
            op: Some(OpRef::default()),
        };
        assert_eq!(zero.encode(EPOCH)[53], 1);
        assert_eq!(forge(&zero, &|_| {}), Ok(Some(zero)));
        let none = Record::Reset {
            client: 1,
            op: None,
        };
        assert_eq!(forge(&none, &|_| {}), Ok(Some(none)));
        assert_eq!(
            forge(&none, &|b| b[41] = 1),
            Err("a request reference without its flag".to_string())
        );
        assert_eq!(
            forge(&none, &|b| b[53] = 2),
            Err("request flag 2".to_string())
        );
        let reserve = Record::Reserve {
            client: 1,
            pool: 0,
            total: 3,
            op: op(9),
            unreserve: true,
            answer: 3,
        };
        assert_eq!(forge(&reserve, &|_| {}), Ok(Some(reserve)));
        assert_eq!(
            forge(&reserve, &|b| b[16] = 3),
            Err("reservation of opcode 3".to_string())
        );
    }

    #[test]
    fn records_that_cannot_follow_their_journal_are_errors() {
        let put = |client, pool, content| Record::Put {
            client,
            pool,
            object: object(1),
            index: 0,
            content,
            reserved: false,
        };
        let err = |rs: &[Record]| {
            let s = scan(path(), &journal(rs)).unwrap();
            replay(path(), Replayed::default(), &s.records)
                .unwrap_err()
                .to_string()
        };
        let new_pool = |pool, flags| Record::NewPool {
            client: 1,
            pool,
            flags,
            uuid: None,
            op: op(0),
        };
        let content = Record::Pattern {
            entry: 1,
            pattern: 5,
        };
        assert_eq!(
            err(&[content, put(1, 0, 1)]),
            "journal /state/d1.journal: record 1: pool 0 of client 1 does not exist"
        );
        assert_eq!(
            err(&[new_pool(0, POOL_PERSISTENT), put(1, 0, 1)]),
            "journal /state/d1.journal: record 1: page of unknown content entry 1"
        );
        assert_eq!(
            err(&[new_pool(0, 0), content, put(1, 0, 1)]),
            "journal /state/d1.journal: record 2: a page record for an ephemeral pool"
        );
        assert_eq!(
            err(&[new_pool(0, 0), new_pool(0, 0)]),
            "journal /state/d1.journal: record 1: pool 0 of client 1 created twice"
        );
        assert_eq!(
            err(&[new_pool(16, 0)]),
            "journal /state/d1.journal: record 0: pool id 16 out of range"
        );
        assert_eq!(
            err(&[new_pool(0, POOL_SHARED)]),
            "journal /state/d1.journal: record 0: a shared pool without a uuid, or the reverse"
        );
        // An entry defined again while a page references it (a slot freed
        // before the record that dropped its last reference).
        let pool = new_pool(0, POOL_PERSISTENT);
        let flush = Record::FlushPage {
            client: 1,
            pool: 0,
            object: object(1),
            index: 0,
        };
        assert_eq!(
            err(&[pool, content, put(1, 0, 1), content]),
            "journal /state/d1.journal: record 3: content entry 1 defined again while pages reference it"
        );
        let s = scan(
            path(),
            &journal(&[pool, content, put(1, 0, 1), flush, content]),
        )
        .unwrap();
        replay(path(), Replayed::default(), &s.records).unwrap();
        let reset = Record::Reset {
            client: 1,
            op: op(0),
        };
        let s = scan(
            path(),
            &journal(&[pool, content, put(1, 0, 1), reset, content]),
        )
        .unwrap();
        replay(path(), Replayed::default(), &s.records).unwrap();
        assert_eq!(
            err(&[Record::Move { entry: 1, addr: 2 }]),
            "journal /state/d1.journal: record 0: move of content entry 1, not in a slot"
        );
        assert_eq!(
            err(&[Record::Pattern {
                entry: ZERO_CONTENT,
                pattern: 1
            }]),
            format!(
                "journal /state/d1.journal: record 0: content entry {ZERO_CONTENT} out of range"
            )
        );
    }

    #[test]
    fn a_writer_appends_in_parallel_and_a_missing_journal_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.journal");
        let rs = every_kind();
        let w = JournalWriter::create(&p, EPOCH, 2, 4 * rs.len() as u64).unwrap();
        assert!(w.is_empty());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for r in &rs {
                        w.append(r).unwrap();
                    }
                });
            }
        });
        assert_eq!(w.len(), (1 + 4 * rs.len() as u64) * RECORD_BYTES as u64);
        // Full: refused, and nothing is written past the end.
        let e = w.append(&rs[0]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "journal {}: full ({} bytes); a checkpoint is due",
                p.display(),
                w.len()
            )
        );
        assert_eq!(w.len(), fs_len(&p));
        let s = read_journal(&p).unwrap();
        assert_eq!((s.epoch, s.domain, s.skipped), (EPOCH, 2, 0));
        assert_eq!(s.records.len(), 4 * rs.len());
        let mut got: Vec<Record> = s.records.iter().map(|(_, r)| *r).collect();
        let mut want: Vec<Record> = (0..4).flat_map(|_| rs.iter().copied()).collect();
        let key = |r: &Record| format!("{r:?}");
        got.sort_by_key(key);
        want.sort_by_key(key);
        assert_eq!(got, want);
        // What was appended survives the writer (a crash unmaps it too).
        drop(w);
        assert_eq!(read_journal(&p).unwrap().records.len(), 4 * rs.len());
        // A journal is never overwritten.
        let e = JournalWriter::create(&p, EPOCH, 2, 1)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("journal {}: ", p.display())), "{e}");
        let missing = dir.path().join("none.journal");
        let e = read_journal(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("journal {}: ", missing.display())),
            "{e}"
        );
        assert!(e.contains("No such file"), "{e}");
    }
}
