// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The crash-safe state's directory and its arena (docs/ARCHITECTURE.md,
//! "Crash-safe state"): a store made by `Store::create` keeps its slab
//! chunks in the arena (`alloc.rs`), and `Store::recover` opens it.
//!
//! ```text
//! DIR/format   "vtmem-state 1\n"
//! DIR/lock     empty; flock(LOCK_EX) by the one store using DIR
//! DIR/arena    extents × EXTENT_BYTES, mapped MAP_SHARED: slab chunks
//! DIR/chunks   header: "VTMEMCHK" | version u32 | extents u32 | 0 x40
//!                      | xxh3-64 of bytes 0..56                  64 bytes
//!              then 16 bytes per extent: chunk u32 | class u8
//!                      | 0x80 + shard u8 | 0 u16 | domain u32 | 0 u16
//!                      | check u16 (xxh3 of the first 14 bytes, seeded
//!                      with the extent number); all zero: the extent
//!                      is free
//! ```
//!
//! An extent's directory entry is written before the extent is handed to
//! the slab (so before its first slot holds data) and cleared when the
//! slab gives it back, before it is punched and reused. A 16-byte
//! `pwrite` at a 16-byte offset is not torn by the death of the process
//! (the kernel copies it before it acts on the signal); the check catches
//! anything else.
//!
//! # Trust boundary
//!
//! The directory is mode 0700 and its files 0600, owned by the store's
//! user, and one store at a time holds its lock. Only a process of that
//! user can change the arena under the mapping: truncating it would
//! raise SIGBUS, writing into it would change stored bytes. Such a
//! process can equally ptrace the store, so it is inside the boundary.
//! Everything else read from these files (the directory entries, the
//! lengths) is checked, and a mismatch is an error naming the file.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rustix::fs::{fallocate, flock, FallocateFlags, FlockOperation};
use rustix::mm::{madvise, mmap, munmap, Advice, MapFlags, ProtFlags};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::alloc::CHUNK_BYTES;

/// Bytes of one arena extent: one slab chunk.
pub const EXTENT_BYTES: usize = CHUNK_BYTES;
/// The contents of `DIR/format`.
pub const STATE_FORMAT: &str = "vtmem-state 1\n";
/// First bytes of `DIR/chunks`.
pub const CHUNKS_MAGIC: [u8; 8] = *b"VTMEMCHK";
const CHUNKS_VERSION: u32 = 1;
const HEADER: u64 = 64;
/// Bytes of one chunk directory entry.
const ENTRY: u64 = 16;
/// Most extents an arena may have (4 TiB).
pub const MAX_EXTENTS: u32 = 1 << 26;

/// Why a state directory could not be created, opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("state directory {0} does not exist")]
    Missing(PathBuf),
    #[error("state directory {0} is not empty: create a new state in an empty directory")]
    NotEmpty(PathBuf),
    #[error("{0}: not a vtmem state directory ({1})")]
    Foreign(PathBuf, String),
    #[error("state directory {0} is in use by another process")]
    InUse(PathBuf),
    #[error("{0}: {1}")]
    Corrupt(PathBuf, String),
}

/// Allocates `len` bytes at `offset` of `file` (named `path`) on its file
/// system, so that writing them through a mapping cannot fail: a write
/// to a hole a full file system cannot fill kills the process with
/// SIGBUS. A file system without `fallocate` (tmpfs has it) is written as
/// before, with a warning logged once a process.
pub(crate) fn allocate(file: &File, path: &Path, offset: u64, len: u64) -> io::Result<()> {
    match fallocate(file, FallocateFlags::KEEP_SIZE, offset, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                log::warn!(
                    "{}: its file system cannot allocate ahead (fallocate): if it fills up, \
                     vtmemd dies (SIGBUS) instead of refusing puts; use a tmpfs",
                    path.display()
                );
            });
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The file that marks a state directory whose creation is not done.
const CREATING: &str = "creating";

/// Every file `Store::create` writes before it serves.
const CREATED_FILES: [&str; 7] = [
    "lock", CREATING, "format", "arena", "chunks", "seed", "clients",
];

/// A state directory, locked for this process.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    /// Holds the lock while the state is in use.
    lock: File,
}

fn lock(path: &Path) -> Result<File, StateError> {
    let p = path.join("lock");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&p)
        .map_err(|e| StateError::Io(p.clone(), e))?;
    match flock(&f, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(StateError::InUse(path.to_path_buf())),
        Err(e) => Err(StateError::Io(p, e.into())),
    }
}

impl StateDir {
    /// Creates a new state in `path`: a new directory (mode 0700), or an
    /// empty one.
    pub fn create(path: &Path) -> Result<StateDir, StateError> {
        let io = |e| StateError::Io(path.to_path_buf(), e);
        match fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Empty, or with only the lock an interrupted creation
                // left (see `clear_interrupted_creation`).
                for e in fs::read_dir(path).map_err(io)? {
                    if e.map_err(io)?.file_name() != "lock" {
                        return Err(StateError::NotEmpty(path.to_path_buf()));
                    }
                }
            }
            Err(e) => return Err(io(e)),
        }
        let lock = lock(path)?;
        // The marker first: a crash before `Store::create` is done leaves
        // it, and `Store::open` then knows that no store ever served from
        // the directory (see `StateDir::clear_interrupted_creation`).
        let marker = path.join(CREATING);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&marker)
            .map_err(|e| StateError::Io(marker, e))?;
        let f = path.join("format");
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&f)
            .and_then(|file| file.write_all_at(STATE_FORMAT.as_bytes(), 0))
            .map_err(|e| StateError::Io(f, e))?;
        Ok(StateDir {
            path: path.to_path_buf(),
            lock,
        })
    }

    /// Marks the creation done: the store is about to serve.
    pub(crate) fn created(&self) -> Result<(), StateError> {
        let marker = self.path.join(CREATING);
        fs::remove_file(&marker).map_err(|e| StateError::Io(marker, e))
    }

    /// Whether `path` holds what a `Store::create` that did not finish
    /// left (its marker, or only the lock and format files it writes
    /// before the marker): no store ever served from it, so nothing in it
    /// was ever acknowledged. If so, its files are removed (under its
    /// lock), so that a store can be created there.
    pub fn clear_interrupted_creation(path: &Path) -> Result<bool, StateError> {
        let io = |e| StateError::Io(path.to_path_buf(), e);
        let names: Vec<String> = fs::read_dir(path)
            .map_err(io)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()
            .map_err(io)?;
        let marked = names.iter().any(|n| n == CREATING);
        let before_marker = names.iter().all(|n| n == "lock" || n == "format");
        if !(marked || before_marker) || names.iter().any(|n| !CREATED_FILES.contains(&n.as_str()))
        {
            return Ok(false);
        }
        let _held = lock(path)?;
        for n in names.iter().filter(|n| *n != "lock") {
            let p = path.join(n);
            fs::remove_file(&p).map_err(|e| StateError::Io(p, e))?;
        }
        Ok(true)
    }

    /// Opens the state in `path`, which a store created.
    pub fn open(path: &Path) -> Result<StateDir, StateError> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::Missing(path.to_path_buf()))
            }
            Err(e) => return Err(StateError::Io(path.to_path_buf(), e)),
        };
        if !meta.is_dir() {
            return Err(StateError::Foreign(
                path.to_path_buf(),
                "not a directory".into(),
            ));
        }
        let f = path.join("format");
        let format = match fs::read(&f) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::Foreign(
                    path.to_path_buf(),
                    "it has no format file".into(),
                ))
            }
            Err(e) => return Err(StateError::Io(f, e)),
        };
        if format != STATE_FORMAT.as_bytes() {
            let shown = String::from_utf8_lossy(&format[..format.len().min(40)]).into_owned();
            return Err(StateError::Foreign(
                f,
                format!(
                    "it says {:?}; this store reads {:?}",
                    shown.trim_end(),
                    STATE_FORMAT.trim_end()
                ),
            ));
        }
        Ok(StateDir {
            lock: lock(path)?,
            path: path.to_path_buf(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a slab chunk is: its dedup domain (the durable number the
/// `clients` file gives it), shard, size class and chunk number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkTag {
    pub domain: u32,
    pub shard: u8,
    pub class: u8,
    pub chunk: u32,
}

impl ChunkTag {
    fn encode(&self, extent: u32) -> [u8; ENTRY as usize] {
        let mut b = [0u8; ENTRY as usize];
        b[..4].copy_from_slice(&self.chunk.to_le_bytes());
        b[4] = self.class;
        b[5] = 0x80 | self.shard;
        b[8..12].copy_from_slice(&self.domain.to_le_bytes());
        let check = xxh3_64_with_seed(&b[..14], u64::from(extent)) as u16;
        b[14..].copy_from_slice(&check.to_le_bytes());
        b
    }

    fn decode(b: &[u8], extent: u32) -> Result<Option<ChunkTag>, String> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let check = xxh3_64_with_seed(&b[..14], u64::from(extent)) as u16;
        if u16::from_le_bytes([b[14], b[15]]) != check || b[5] & 0x80 == 0 {
            return Err(format!("extent {extent}: entry fails its check"));
        }
        Ok(Some(ChunkTag {
            domain: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            chunk: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            class: b[4],
            shard: b[5] & 0x7f,
        }))
    }
}

#[derive(Debug)]
struct Free {
    /// Extents given back (punched), reused first.
    list: Vec<u32>,
    /// Extents below this have been handed out at least once.
    next: u32,
}

/// The arena: `DIR/arena` mapped shared, cut into extents, with its
/// chunk directory `DIR/chunks`.
#[derive(Debug)]
pub struct Arena {
    /// The state directory's lock, held while the arena is mapped.
    _lock: File,
    arena_path: PathBuf,
    chunks_path: PathBuf,
    arena: File,
    chunks: File,
    base: NonNull<u8>,
    extents: u32,
    free: Mutex<Free>,
    /// The last extent could not be allocated (logged once).
    no_room: AtomicBool,
    /// While an opened arena's state is recovered: the extents dropped,
    /// given back by [`Arena::recovered`].
    deferred: Mutex<Option<Vec<u32>>>,
}

// SAFETY: the mapping is plain memory shared by the process's threads;
// every extent is handed to exactly one `Extent` at a time (the free list
// is under a mutex), so no two threads reach the same bytes through the
// arena, and the files are only used through `pwrite`/`fallocate`, which
// are thread-safe.
unsafe impl Send for Arena {}
// SAFETY: as for `Send`: `&Arena` gives no access to extent bytes.
unsafe impl Sync for Arena {}

fn chunks_header(extents: u32) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(&CHUNKS_MAGIC);
    h[8..12].copy_from_slice(&CHUNKS_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&extents.to_le_bytes());
    let check = xxh3_64_with_seed(&h[..56], 0);
    h[56..].copy_from_slice(&check.to_le_bytes());
    h
}

impl Arena {
    /// Creates the arena of `dir` with room for `extents` extents (a
    /// sparse file: memory is taken only as extents are written).
    pub fn create(dir: &StateDir, extents: u32) -> Result<Arc<Arena>, StateError> {
        let arena_path = dir.path().join("arena");
        let chunks_path = dir.path().join("chunks");
        if extents == 0 || extents > MAX_EXTENTS {
            return Err(StateError::Corrupt(
                arena_path,
                format!("{extents} extents: between 1 and {MAX_EXTENTS}"),
            ));
        }
        let new = |p: &Path, len: u64| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)?;
            f.set_len(len)?;
            Ok::<File, io::Error>(f)
        };
        let arena = new(&arena_path, u64::from(extents) * EXTENT_BYTES as u64)
            .map_err(|e| StateError::Io(arena_path.clone(), e))?;
        let chunks = new(&chunks_path, HEADER + ENTRY * u64::from(extents))
            .and_then(|f| f.write_all_at(&chunks_header(extents), 0).map(|()| f))
            .map_err(|e| StateError::Io(chunks_path.clone(), e))?;
        let a = Arena::map(dir, arena_path, chunks_path, arena, chunks, extents, 0)?;
        Ok(Arc::new(a))
    }

    /// Opens the arena of `dir`; returns it with every extent its chunk
    /// directory lists. Extents it does not list are punched (a crash may
    /// have left one cleared but not yet punched).
    #[allow(clippy::type_complexity)]
    pub fn open(dir: &StateDir) -> Result<(Arc<Arena>, Vec<(ChunkTag, Extent)>), StateError> {
        let arena_path = dir.path().join("arena");
        let chunks_path = dir.path().join("chunks");
        let open = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
        let chunks = open(&chunks_path).map_err(|e| StateError::Io(chunks_path.clone(), e))?;
        let table = {
            let len = chunks
                .metadata()
                .map_err(|e| StateError::Io(chunks_path.clone(), e))?
                .len();
            if len < HEADER || len > HEADER + ENTRY * u64::from(MAX_EXTENTS) {
                return Err(StateError::Corrupt(
                    chunks_path,
                    format!("{len} bytes: not a chunk directory"),
                ));
            }
            let mut b = vec![0u8; len as usize];
            chunks
                .read_exact_at(&mut b, 0)
                .map_err(|e| StateError::Io(chunks_path.clone(), e))?;
            b
        };
        let corrupt = |what: String| StateError::Corrupt(chunks_path.clone(), what);
        let h = &table[..HEADER as usize];
        if h[..8] != CHUNKS_MAGIC {
            return Err(corrupt("not a chunk directory (bad magic)".into()));
        }
        if u64::from_le_bytes(h[56..].try_into().unwrap_or_default())
            != xxh3_64_with_seed(&h[..56], 0)
        {
            return Err(corrupt("the header fails its checksum".into()));
        }
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if version != CHUNKS_VERSION {
            return Err(corrupt(format!(
                "version {version} is not supported (this store reads version {CHUNKS_VERSION})"
            )));
        }
        let extents = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if extents == 0 || table.len() as u64 != HEADER + ENTRY * u64::from(extents) {
            return Err(corrupt(format!(
                "{} bytes for {extents} extents",
                table.len()
            )));
        }
        let arena = open(&arena_path).map_err(|e| StateError::Io(arena_path.clone(), e))?;
        let len = arena
            .metadata()
            .map_err(|e| StateError::Io(arena_path.clone(), e))?
            .len();
        if len != u64::from(extents) * EXTENT_BYTES as u64 {
            return Err(StateError::Corrupt(
                arena_path,
                format!(
                    "{len} bytes; its chunk directory says {extents} extents of {EXTENT_BYTES}"
                ),
            ));
        }
        let mut tags = Vec::new();
        let mut seen = HashSet::new();
        let mut last_used = 0;
        for n in 0..extents {
            let at = (HEADER + ENTRY * u64::from(n)) as usize;
            if let Some(t) =
                ChunkTag::decode(&table[at..at + ENTRY as usize], n).map_err(corrupt)?
            {
                if !seen.insert(t) {
                    return Err(corrupt(format!(
                        "extent {n}: chunk {} of class {} of shard {} listed twice",
                        t.chunk, t.class, t.shard
                    )));
                }
                tags.push((n, t));
                last_used = n + 1;
            }
        }
        let mut a = Arena::map(
            dir,
            arena_path,
            chunks_path,
            arena,
            chunks,
            extents,
            last_used,
        )?;
        // Extents dropped while the state is recovered are given back only
        // once it is recovered ([`Arena::recovered`]).
        a.deferred = Mutex::new(Some(Vec::new()));
        let a = Arc::new(a);
        // Free every extent below the bump that is not listed.
        {
            let listed: HashSet<u32> = tags.iter().map(|(n, _)| *n).collect();
            let mut free = a.free.lock();
            for n in (0..last_used).rev() {
                if !listed.contains(&n) {
                    a.punch(n)?;
                    free.list.push(n);
                }
            }
        }
        let out = tags.into_iter().map(|(n, t)| (t, a.extent(n))).collect();
        Ok((a, out))
    }

    fn map(
        dir: &StateDir,
        arena_path: PathBuf,
        chunks_path: PathBuf,
        arena: File,
        chunks: File,
        extents: u32,
        next: u32,
    ) -> Result<Arena, StateError> {
        let lock = dir
            .lock
            .try_clone()
            .map_err(|e| StateError::Io(dir.path.join("lock"), e))?;
        let len = extents as usize * EXTENT_BYTES;
        // SAFETY: a new mapping chosen by the kernel (no address hint)
        // overlaps nothing of ours; the file is at least `len` bytes long
        // (created so, or checked by `open`), and the trust boundary (module
        // docs) keeps it so while it is mapped.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &arena,
                0,
            )
        }
        .map_err(|e| StateError::Io(arena_path.clone(), e.into()))?;
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| {
            StateError::Io(arena_path.clone(), io::Error::other("mmap returned null"))
        })?;
        Ok(Arena {
            _lock: lock,
            arena_path,
            chunks_path,
            arena,
            chunks,
            base,
            extents,
            free: Mutex::new(Free {
                list: Vec::new(),
                next,
            }),
            no_room: AtomicBool::new(false),
            deferred: Mutex::new(None),
        })
    }

    /// Ends a recovery: the extents dropped meanwhile (chunks no content
    /// uses, a removed client's) are given back now. Until then a
    /// recovery that fails, at any step, leaves every listed extent as it
    /// was: dropping one then keeps it, listed, for the next open.
    pub fn recovered(&self) {
        let deferred = self.deferred.lock().take();
        for n in deferred.into_iter().flatten() {
            self.release(n);
        }
    }

    /// Extents the arena has room for.
    pub fn capacity(&self) -> u32 {
        self.extents
    }

    fn extent(self: &Arc<Self>, n: u32) -> Extent {
        debug_assert!(n < self.extents);
        // SAFETY: `n < extents`, so the offset stays inside the mapping of
        // `extents × EXTENT_BYTES` bytes.
        let ptr = unsafe { self.base.add(n as usize * EXTENT_BYTES) };
        Extent {
            arena: self.clone(),
            n,
            ptr,
        }
    }

    fn punch(&self, n: u32) -> Result<(), StateError> {
        self.punch_range(n, 0, EXTENT_BYTES)
    }

    /// Punches bytes `from..to` of extent `n`: they read as zero after,
    /// and hold no memory.
    fn punch_range(&self, n: u32, from: usize, to: usize) -> Result<(), StateError> {
        debug_assert!(from <= to && to <= EXTENT_BYTES);
        fallocate(
            &self.arena,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            u64::from(n) * EXTENT_BYTES as u64 + from as u64,
            (to - from) as u64,
        )
        .map_err(|e| StateError::Io(self.arena_path.clone(), e.into()))
    }

    /// Allocates bytes `from..to` of extent `n` (zeroed where they were a
    /// hole): writes to them can no longer fail for want of memory.
    fn allocate_range(&self, n: u32, from: usize, to: usize) -> Result<(), StateError> {
        debug_assert!(from <= to && to <= EXTENT_BYTES);
        allocate(
            &self.arena,
            &self.arena_path,
            u64::from(n) * EXTENT_BYTES as u64 + from as u64,
            (to - from) as u64,
        )
        .map_err(|e| StateError::Io(self.arena_path.clone(), e))
    }

    fn write_entry(&self, n: u32, b: &[u8; ENTRY as usize]) -> Result<(), StateError> {
        self.chunks
            .write_all_at(b, HEADER + ENTRY * u64::from(n))
            .map_err(|e| StateError::Io(self.chunks_path.clone(), e))
    }

    /// A zeroed extent for chunk `tag`, listed in the chunk directory
    /// before it is returned.
    pub fn alloc(self: &Arc<Self>, tag: ChunkTag) -> Result<Extent, StateError> {
        let n = {
            let mut free = self.free.lock();
            match free.list.pop() {
                Some(n) => n,
                None if free.next < self.extents => {
                    free.next += 1;
                    free.next - 1
                }
                None => {
                    return Err(StateError::Io(
                        self.arena_path.clone(),
                        io::Error::new(io::ErrorKind::StorageFull, "every extent is in use"),
                    ))
                }
            }
        };
        // The extent's memory is taken now, all of it: a file system that
        // is full says so here (the put is refused), where a write to a
        // page of the mapping it cannot back would kill the process with
        // SIGBUS.
        let taken = self
            .allocate_range(n, 0, EXTENT_BYTES)
            .and_then(|()| self.write_entry(n, &tag.encode(n)));
        if let Err(e) = taken {
            let _ = self.punch(n);
            self.free.lock().list.push(n);
            // Once per episode: every put that needs a chunk meanwhile
            // fails the same way.
            if !self.no_room.swap(true, Ordering::Relaxed) {
                log::error!("{e}; puts that need a new chunk are refused until there is room");
            }
            return Err(e);
        }
        if self.no_room.swap(false, Ordering::Relaxed) {
            log::warn!(
                "arena {}: chunks can be taken again",
                self.arena_path.display()
            );
        }
        let e = self.extent(n);
        // Its pages mapped at once, not one fault per first write of each
        // (a hint: where the kernel lacks it, the writes fault them in).
        // SAFETY: the range is the extent's, inside the live mapping, and
        // populating writes nothing to the memory (its pages are already
        // allocated, zeroed, above).
        let _ = unsafe {
            madvise(
                e.ptr.as_ptr().cast(),
                EXTENT_BYTES,
                Advice::LinuxPopulateWrite,
            )
        };
        Ok(e)
    }

    /// Unlists extent `n`, then punches it (its memory goes back to the
    /// host) and makes it reusable. If either fails, the extent is not
    /// reused (a later open punches it).
    fn release(&self, n: u32) {
        let done = self
            .write_entry(n, &[0; ENTRY as usize])
            .and_then(|()| self.punch(n));
        match done {
            Ok(()) => self.free.lock().list.push(n),
            Err(e) => log::warn!("arena extent {n} not released: {e}"),
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: `base` and the length are those of the mapping made in
        // `map`; every `Extent` holds an `Arc` of the arena, so none is left
        // to reach the memory.
        if let Err(e) = unsafe {
            munmap(
                self.base.as_ptr().cast(),
                self.extents as usize * EXTENT_BYTES,
            )
        } {
            log::warn!("arena {}: munmap: {e}", self.arena_path.display());
        }
    }
}

/// One extent of the arena, held by one slab chunk; given back (unlisted
/// and punched) when dropped.
#[derive(Debug)]
pub struct Extent {
    arena: Arc<Arena>,
    n: u32,
    ptr: NonNull<u8>,
}

// SAFETY: an extent is the only way to its bytes (the arena hands each out
// once at a time), so it may move to another thread like a `Box<[u8]>`.
unsafe impl Send for Extent {}
// SAFETY: `&Extent` only reads.
unsafe impl Sync for Extent {}

impl Extent {
    /// The extent's number in the arena.
    pub fn number(&self) -> u32 {
        self.n
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` starts EXTENT_BYTES of the live mapping (the `Arc`
        // keeps it mapped) that only this extent reaches, and `&self` is
        // not aliased by a `&mut`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), EXTENT_BYTES) }
    }

    /// Its bytes, to write.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only
        // reference to them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), EXTENT_BYTES) }
    }
}

impl Extent {
    /// Zeroes the extent from byte `from` to its end: what an adopted
    /// chunk does above the slots it uses, which an earlier process may
    /// have written.
    pub fn zero_from(&mut self, from: usize) -> Result<(), StateError> {
        let from = from.min(EXTENT_BYTES);
        let page = from.div_ceil(4096) * 4096;
        // Up to the page boundary by hand (that page holds slots in use).
        self.bytes_mut()[from..page.min(EXTENT_BYTES)].fill(0);
        if page < EXTENT_BYTES {
            // Punched to zero it, allocated again so that later writes
            // cannot fail (see `Arena::alloc`).
            self.arena.punch_range(self.n, page, EXTENT_BYTES)?;
            self.arena.allocate_range(self.n, page, EXTENT_BYTES)?;
        }
        Ok(())
    }

    /// Lets go of the extent without giving it back: it stays listed in
    /// the chunk directory with its bytes, for the next open (what a store
    /// that stops does with the chunks that hold its pages).
    pub fn keep(self) {
        let mut me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never used or dropped again, so its `arena` is
        // dropped exactly once, here.
        unsafe { std::ptr::drop_in_place(&mut me.arena) };
    }
}

impl Drop for Extent {
    fn drop(&mut self) {
        if let Some(list) = self.arena.deferred.lock().as_mut() {
            list.push(self.n);
            return;
        }
        self.arena.release(self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tag(chunk: u32) -> ChunkTag {
        ChunkTag {
            domain: 7,
            shard: 1,
            class: 63,
            chunk,
        }
    }

    #[test]
    fn a_state_directory_is_created_once_and_opened_by_one_process() {
        let top = tempfile::tempdir().unwrap();
        let p = top.path().join("state");
        let e = StateDir::open(&p).unwrap_err().to_string();
        assert_eq!(e, format!("state directory {} does not exist", p.display()));
        let d = StateDir::create(&p).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            StateDir::open(&p).unwrap_err().to_string(),
            format!(
                "state directory {} is in use by another process",
                p.display()
            )
        );
        assert_eq!(
            StateDir::create(&p).unwrap_err().to_string(),
            format!(
                "state directory {} is not empty: create a new state in an empty directory",
                p.display()
            )
        );
        drop(d);
        StateDir::open(&p).unwrap();
    }

    #[test]
    fn a_foreign_directory_is_refused_with_its_reason() {
        let top = tempfile::tempdir().unwrap();
        let p = top.path().join("other");
        fs::create_dir(&p).unwrap();
        assert_eq!(
            StateDir::open(&p).unwrap_err().to_string(),
            format!(
                "{}: not a vtmem state directory (it has no format file)",
                p.display()
            )
        );
        fs::write(p.join("format"), "vtmem-state 9\n").unwrap();
        assert_eq!(
            StateDir::open(&p).unwrap_err().to_string(),
            format!(
                "{}: not a vtmem state directory (it says \"vtmem-state 9\"; this store reads \"vtmem-state 1\")",
                p.join("format").display()
            )
        );
        let f = top.path().join("file");
        fs::write(&f, "x").unwrap();
        assert_eq!(
            StateDir::open(&f).unwrap_err().to_string(),
            format!(
                "{}: not a vtmem state directory (not a directory)",
                f.display()
            )
        );
    }

    #[test]
    fn listed_extents_survive_and_released_ones_return_their_memory() {
        let top = tempfile::tempdir().unwrap();
        let p = top.path().join("state");
        let d = StateDir::create(&p).unwrap();
        let a = Arena::create(&d, 8).unwrap();
        let mut kept = Vec::new();
        for c in 0..4 {
            let mut e = a.alloc(tag(c)).unwrap();
            assert!(e.bytes().iter().all(|&b| b == 0));
            e.bytes_mut().fill(c as u8 + 1);
            kept.push(e);
        }
        let blocks = || fs::metadata(p.join("arena")).unwrap().blocks();
        let full = blocks();
        assert!(full >= 4 * EXTENT_BYTES as u64 / 512, "{full}");
        // Chunk 1 is emptied and given back: its memory returns.
        let e1 = kept.remove(1);
        assert_eq!(e1.number(), 1);
        drop(e1);
        assert!(blocks() <= full - EXTENT_BYTES as u64 / 512);
        // The process dies: nothing is given back, nothing unmapped in
        // order; the lock goes with the process's files.
        for e in kept {
            e.keep();
        }
        drop(a);
        drop(d);
        let d = StateDir::open(&p).unwrap();
        let (a, mut got) = Arena::open(&d).unwrap();
        got.sort_by_key(|(t, _)| t.chunk);
        let chunks: Vec<u32> = got.iter().map(|(t, _)| t.chunk).collect();
        assert_eq!(chunks, [0, 2, 3]);
        for (t, e) in &got {
            assert_eq!(e.number(), t.chunk);
            assert!(e.bytes().iter().all(|&b| b == t.chunk as u8 + 1));
        }
        // The freed extent is reused first, and zeroed.
        let e = a.alloc(tag(9)).unwrap();
        assert_eq!(e.number(), 1);
        assert!(e.bytes().iter().all(|&b| b == 0));
        // Full.
        let more: Vec<Extent> = (10..14).map(|c| a.alloc(tag(c)).unwrap()).collect();
        assert!(a
            .alloc(tag(20))
            .unwrap_err()
            .to_string()
            .contains("every extent is in use"));
        drop(more);
        drop(got);
    }

    /// Reopens after `f` has changed the state's files; returns the error.
    fn reopen_after(f: impl FnOnce(&Path)) -> String {
        let top = tempfile::tempdir().unwrap();
        let p = top.path().join("state");
        {
            let d = StateDir::create(&p).unwrap();
            let a = Arena::create(&d, 4).unwrap();
            a.alloc(tag(0)).unwrap().keep();
            a.alloc(tag(1)).unwrap().keep();
        }
        f(&p);
        let d = StateDir::open(&p).unwrap();
        Arena::open(&d).unwrap_err().to_string()
    }

    fn patch(p: &Path, at: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    #[test]
    fn a_corrupt_arena_or_chunk_directory_is_an_error_naming_the_file() {
        let chunks = |p: &Path| p.join("chunks").display().to_string();
        let mut name = String::new();
        let e = reopen_after(|p| {
            name = chunks(p);
            patch(&p.join("chunks"), HEADER + ENTRY + 2, &[0x55]);
        });
        assert_eq!(e, format!("{name}: extent 1: entry fails its check"));
        let e = reopen_after(|p| {
            name = chunks(p);
            // Extent 1 claims to be chunk 0, like extent 0.
            patch(&p.join("chunks"), HEADER + ENTRY, &tag(0).encode(1));
        });
        assert_eq!(
            e,
            format!("{name}: extent 1: chunk 0 of class 63 of shard 1 listed twice")
        );
        let e = reopen_after(|p| {
            name = chunks(p);
            patch(&p.join("chunks"), 0, b"XX");
        });
        assert_eq!(e, format!("{name}: not a chunk directory (bad magic)"));
        let e = reopen_after(|p| {
            name = chunks(p);
            patch(&p.join("chunks"), 13, &[1]);
        });
        assert_eq!(e, format!("{name}: the header fails its checksum"));
        let e = reopen_after(|p| {
            name = chunks(p);
            let f = OpenOptions::new()
                .write(true)
                .open(p.join("chunks"))
                .unwrap();
            f.set_len(HEADER + ENTRY * 3).unwrap();
        });
        assert_eq!(e, format!("{name}: 112 bytes for 4 extents"));
        let e = reopen_after(|p| {
            name = chunks(p);
            let f = OpenOptions::new()
                .write(true)
                .open(p.join("chunks"))
                .unwrap();
            f.set_len(10).unwrap();
        });
        assert_eq!(e, format!("{name}: 10 bytes: not a chunk directory"));
        let e = reopen_after(|p| {
            name = p.join("arena").display().to_string();
            let f = OpenOptions::new()
                .write(true)
                .open(p.join("arena"))
                .unwrap();
            f.set_len(EXTENT_BYTES as u64).unwrap();
        });
        assert_eq!(
            e,
            format!("{name}: 65536 bytes; its chunk directory says 4 extents of 65536")
        );
        let e = reopen_after(|p| {
            name = p.join("arena").display().to_string();
            fs::remove_file(p.join("arena")).unwrap();
        });
        assert!(e.starts_with(&format!("state directory {name}: ")), "{e}");
        assert!(e.contains("No such file"), "{e}");
    }
}
