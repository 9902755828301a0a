// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A dedup domain's checkpoint: its live metadata, written compactly so
//! that its journal can start again empty (docs/ARCHITECTURE.md,
//! "Crash-safe state", "Checkpoint"). The store writes one whenever it
//! starts a domain's journal: at creation (empty), after recovery, and
//! at each checkpoint.
//!
//! ```text
//! "VTMEMSNP" | version u32 | 0 u32 | epoch u64 | domain u64     32 bytes
//! contents u32, then each: entry u32 | form u8 (0 LZ4, 1 raw, 2 pattern)
//!                          | LZ4, raw: address u32 | length u16
//!                          | pattern: pattern u64
//! clients u32, then each:  client u32 | pools u32, then each:
//!     pool u8 | flags u8 | uuid [16] (zero: none) | reserved u64
//!     | objects u32, then each: object [u64; 3] | blocks u32, then each:
//!         block u64 | mask u16 | one entry u32 per bit of the mask
//!         (the page at index block × 16 + bit)
//! pending u32, then each: client u32 | queue u16 | position u16 | op u8
//!     | opcode u8 | asked u8 | 0 u8 | tag u64 | value u64     (28 bytes)
//! xxh3-64 of everything before it
//! ```
//!
//! Integers are little-endian. A dense object costs about 4.6 bytes per
//! page (a block of 16 in 74 bytes) plus 11 bytes per content entry. The
//! `epoch` is that of the journal that follows the checkpoint: recovery
//! replays only a journal with that epoch onto it. A snapshot is written
//! to `NAME.new` and renamed over `NAME`, so a crash leaves the old one or
//! the new one, never a mix; the checksum and every count are checked
//! all the same, and anything wrong is an error naming the file.
//!
//! The pending entries are each client's pending table (`journal.rs`,
//! [`Pending`]): the non-idempotent operations whose requests were not
//! known answered when the snapshot was taken.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use vtmem_protocol::{
    ObjectId, Uuid, MAX_POOLS_PER_CLIENT, PAGE_SIZE, POOL_PERSISTENT, POOL_SHARED,
};
use xxhash_rust::xxh3::xxh3_64;

use super::journal::{
    Form, Pending, Replayed, ReplayedPool, Stored, OPCODE_DESTROY_POOL, OPCODE_NEW_POOL,
    OPCODE_RESERVE, OPCODE_RESET, OPCODE_UNRESERVE, ZERO_CONTENT,
};

/// First bytes of a snapshot.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"VTMEMSNP";
/// The one version this store writes and reads (2: pending entries
/// instead of version 1's answered records).
pub const SNAPSHOT_VERSION: u32 = 2;
/// Bytes of a pending entry.
const PENDING_BYTES: usize = 28;

const FORM_LZ4: u8 = 0;
const FORM_RAW: u8 = 1;
const FORM_PATTERN: u8 = 2;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("snapshot {0}: {1}")]
    Corrupt(PathBuf, String),
}

/// A snapshot as read back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The epoch of the journal that follows it.
    pub epoch: u64,
    pub domain: u64,
    pub state: Replayed,
}

fn put_u32(b: &mut Vec<u8>, v: usize) {
    // Counts come from in-memory maps far below 2^32 entries.
    b.extend_from_slice(&(v as u32).to_le_bytes());
}

/// The bytes of a snapshot of `state`.
pub fn encode(epoch: u64, domain: u64, state: &Replayed) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&SNAPSHOT_MAGIC);
    b.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&epoch.to_le_bytes());
    b.extend_from_slice(&domain.to_le_bytes());
    let mut contents: Vec<(&u32, &Stored)> = state.contents.iter().collect();
    contents.sort_unstable_by_key(|(e, _)| **e);
    put_u32(&mut b, contents.len());
    for (entry, s) in contents {
        b.extend_from_slice(&entry.to_le_bytes());
        match *s {
            Stored::Slot { addr, len, form } => {
                b.push(match form {
                    Form::Lz4 => FORM_LZ4,
                    Form::Raw => FORM_RAW,
                });
                b.extend_from_slice(&addr.to_le_bytes());
                b.extend_from_slice(&len.to_le_bytes());
            }
            Stored::Pattern(p) => {
                b.push(FORM_PATTERN);
                b.extend_from_slice(&p.to_le_bytes());
            }
        }
    }
    put_u32(&mut b, state.clients.len());
    for (client, pools) in &state.clients {
        b.extend_from_slice(&client.to_le_bytes());
        put_u32(&mut b, pools.len());
        for (pool, p) in pools {
            b.push(*pool);
            b.push(p.flags);
            b.extend_from_slice(p.uuid.as_ref().map_or(&[0; 16], |u| u.as_bytes()));
            b.extend_from_slice(&p.reserved.to_le_bytes());
            encode_pages(&mut b, &p.pages);
        }
    }
    put_u32(&mut b, state.pending.values().map(BTreeMap::len).sum());
    for (client, table) in &state.pending {
        for (&(queue, position, op), p) in table {
            b.extend_from_slice(&client.to_le_bytes());
            b.extend_from_slice(&queue.to_le_bytes());
            b.extend_from_slice(&position.to_le_bytes());
            b.extend_from_slice(&[op, p.opcode, p.asked, 0]);
            b.extend_from_slice(&p.tag.to_le_bytes());
            b.extend_from_slice(&p.value.to_le_bytes());
        }
    }
    let check = xxh3_64(&b);
    b.extend_from_slice(&check.to_le_bytes());
    b
}

/// A block of 16 pages: its number, which are present, their entries.
type Block = (u64, u16, Vec<u32>);

fn encode_pages(b: &mut Vec<u8>, pages: &BTreeMap<(ObjectId, u64), u32>) {
    // Objects in order, each with its blocks of 16 in order.
    let mut objects: Vec<(ObjectId, Vec<Block>)> = Vec::new();
    for (&(object, index), &content) in pages {
        if objects.last().is_none_or(|(o, _)| *o != object) {
            objects.push((object, Vec::new()));
        }
        let Some((_, blocks)) = objects.last_mut() else {
            continue;
        };
        let block = index / 16;
        if blocks.last().is_none_or(|(n, _, _)| *n != block) {
            blocks.push((block, 0, Vec::new()));
        }
        if let Some((_, mask, refs)) = blocks.last_mut() {
            *mask |= 1 << (index % 16);
            refs.push(content);
        }
    }
    put_u32(b, objects.len());
    for (object, blocks) in objects {
        for w in object.0 {
            b.extend_from_slice(&w.to_le_bytes());
        }
        put_u32(b, blocks.len());
        for (block, mask, refs) in blocks {
            b.extend_from_slice(&block.to_le_bytes());
            b.extend_from_slice(&mask.to_le_bytes());
            for r in refs {
                b.extend_from_slice(&r.to_le_bytes());
            }
        }
    }
}

/// Reads a snapshot's bytes, bounds-checked.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn bad(&self, what: impl Into<String>) -> SnapshotError {
        SnapshotError::Corrupt(self.path.to_path_buf(), what.into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| self.bad(format!("truncated at byte {}", self.at)))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, SnapshotError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let mut w = [0u8; 8];
        w.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(w))
    }

    /// A count of items of at least `min` bytes each: no larger than what
    /// is left could hold.
    fn count(&mut self, min: usize, what: &str) -> Result<usize, SnapshotError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min) > self.b.len() - self.at {
            return Err(self.bad(format!("{n} {what}: more than the file holds")));
        }
        Ok(n)
    }
}

/// Reads a snapshot's bytes; `path` names it in errors.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    let bad = |what: String| SnapshotError::Corrupt(path.to_path_buf(), what);
    if bytes.len() < 8 || bytes[..8] != SNAPSHOT_MAGIC {
        return Err(bad("not a vtmem snapshot (bad magic)".into()));
    }
    if bytes.len() < 32 + 8 {
        return Err(bad(format!("{} bytes: truncated", bytes.len())));
    }
    let (body, check) = bytes.split_at(bytes.len() - 8);
    let mut c = Cursor {
        b: body,
        at: 8,
        path,
    };
    let version = c.u32()?;
    if version != SNAPSHOT_VERSION {
        return Err(bad(format!(
            "version {version} is not supported (this store reads version {SNAPSHOT_VERSION})"
        )));
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(check);
    if u64::from_le_bytes(w) != xxh3_64(body) {
        return Err(bad("fails its checksum".into()));
    }
    c.u32()?;
    let epoch = c.u64()?;
    let domain = c.u64()?;
    let mut state = Replayed::default();
    for _ in 0..c.count(7, "contents")? {
        let entry = c.u32()?;
        if entry >= ZERO_CONTENT {
            return Err(c.bad(format!("content entry {entry} out of range")));
        }
        let s = match c.u8()? {
            f @ (FORM_LZ4 | FORM_RAW) => {
                let addr = c.u32()?;
                let len = c.u16()?;
                let form = if f == FORM_RAW { Form::Raw } else { Form::Lz4 };
                let ok = match form {
                    Form::Raw => usize::from(len) == PAGE_SIZE,
                    Form::Lz4 => len > 0 && usize::from(len) <= PAGE_SIZE,
                };
                if !ok {
                    return Err(c.bad(format!("content entry {entry}: {len} bytes")));
                }
                Stored::Slot { addr, len, form }
            }
            FORM_PATTERN => Stored::Pattern(c.u64()?),
            f => return Err(c.bad(format!("content entry {entry}: unknown form {f}"))),
        };
        if state.contents.insert(entry, s).is_some() {
            return Err(c.bad(format!("content entry {entry} listed twice")));
        }
    }
    for _ in 0..c.count(8, "clients")? {
        let client = c.u32()?;
        let mut pools = BTreeMap::new();
        for _ in 0..c.count(30, "pools")? {
            let pool = c.u8()?;
            if u32::from(pool) >= MAX_POOLS_PER_CLIENT {
                return Err(c.bad(format!("client {client}: pool id {pool} out of range")));
            }
            let flags = c.u8()?;
            let mut u = [0u8; 16];
            u.copy_from_slice(c.take(16)?);
            let uuid = if u == [0; 16] {
                None
            } else {
                Some(
                    Uuid::from_bytes(u)
                        .ok_or_else(|| c.bad(format!("pool {pool}: invalid uuid")))?,
                )
            };
            if (flags & POOL_SHARED != 0) != uuid.is_some() {
                return Err(c.bad(format!(
                    "client {client}: pool {pool}: shared without a uuid, or the reverse"
                )));
            }
            let reserved = c.u64()?;
            let mut p = ReplayedPool {
                flags,
                uuid,
                reserved,
                pages: BTreeMap::new(),
            };
            decode_pages(&mut c, &state.contents, &mut p)
                .map_err(|e| prefix(e, &format!("client {client}: pool {pool}: ")))?;
            if flags & POOL_PERSISTENT == 0 && (!p.pages.is_empty() || p.reserved != 0) {
                return Err(c.bad(format!(
                    "client {client}: pool {pool} is ephemeral but has pages or a reservation"
                )));
            }
            if pools.insert(pool, p).is_some() {
                return Err(c.bad(format!("client {client}: pool {pool} listed twice")));
            }
        }
        if state.clients.insert(client, pools).is_some() {
            return Err(c.bad(format!("client {client} listed twice")));
        }
    }
    for _ in 0..c.count(PENDING_BYTES, "pending operations")? {
        let client = c.u32()?;
        let key = (c.u16()?, c.u16()?, c.u8()?);
        let (opcode, asked, zero) = (c.u8()?, c.u8()?, c.u8()?);
        let p = Pending {
            tag: c.u64()?,
            opcode,
            asked,
            value: c.u64()?,
        };
        if !matches!(
            opcode,
            OPCODE_NEW_POOL
                | OPCODE_DESTROY_POOL
                | OPCODE_RESERVE
                | OPCODE_UNRESERVE
                | OPCODE_RESET
        ) || zero != 0
        {
            return Err(c.bad(format!(
                "client {client}: a pending operation of opcode {opcode}"
            )));
        }
        let table = state.pending.entry(client).or_default();
        if table.insert(key, p).is_some() {
            return Err(c.bad(format!(
                "client {client}: pending operation {key:?} listed twice"
            )));
        }
    }
    if c.at != body.len() {
        return Err(c.bad(format!("{} bytes after the end", body.len() - c.at)));
    }
    Ok(Snapshot {
        epoch,
        domain,
        state,
    })
}

fn prefix(e: SnapshotError, p: &str) -> SnapshotError {
    match e {
        SnapshotError::Corrupt(path, what) => SnapshotError::Corrupt(path, format!("{p}{what}")),
        e => e,
    }
}

fn decode_pages(
    c: &mut Cursor<'_>,
    contents: &HashMap<u32, Stored>,
    p: &mut ReplayedPool,
) -> Result<(), SnapshotError> {
    for _ in 0..c.count(28, "objects")? {
        let object = ObjectId([c.u64()?, c.u64()?, c.u64()?]);
        let mut last: Option<u64> = None;
        for _ in 0..c.count(14, "blocks")? {
            let block = c.u64()?;
            let mask = c.u16()?;
            if mask == 0 || block > u64::MAX / 16 || last.is_some_and(|l| l >= block) {
                return Err(c.bad(format!(
                    "object {:?}: block {block} empty, out of range or out of order",
                    object.0
                )));
            }
            last = Some(block);
            for bit in 0..16 {
                if mask & (1 << bit) == 0 {
                    continue;
                }
                let content = c.u32()?;
                if content != ZERO_CONTENT && !contents.contains_key(&content) {
                    return Err(c.bad(format!("a page of unknown content entry {content}")));
                }
                p.pages.insert((object, block * 16 + bit), content);
            }
        }
    }
    Ok(())
}

/// Writes a snapshot of `state` to `path`: to `PATH.new` (mode 0600),
/// synced, then renamed over `path`.
pub fn write_snapshot(
    path: &Path,
    epoch: u64,
    domain: u64,
    state: &Replayed,
) -> Result<(), SnapshotError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let io = |e| SnapshotError::Io(tmp.clone(), e);
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(&encode(epoch, domain, state)).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(|e| SnapshotError::Io(path.to_path_buf(), e))
}

/// Reads the snapshot at `path`.
pub fn read_snapshot(path: &Path) -> Result<Snapshot, SnapshotError> {
    let bytes = fs::read(path).map_err(|e| SnapshotError::Io(path.to_path_buf(), e))?;
    decode(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Replayed {
        let mut r = Replayed::default();
        r.contents.insert(
            3,
            Stored::Slot {
                addr: 0x400,
                len: 1000,
                form: Form::Lz4,
            },
        );
        r.contents.insert(
            4,
            Stored::Slot {
                addr: 9,
                len: PAGE_SIZE as u16,
                form: Form::Raw,
            },
        );
        r.contents.insert(7, Stored::Pattern(0x0101));
        let mut p = ReplayedPool {
            flags: POOL_PERSISTENT,
            reserved: 5,
            ..Default::default()
        };
        for i in [0u64, 1, 2, 15, 16, 40, 1 << 40] {
            p.pages.insert(
                (ObjectId([1, 2, 3]), i),
                [3, 4, 7, ZERO_CONTENT][i as usize % 4],
            );
        }
        p.pages.insert((ObjectId([9, 0, 0]), 5), 3);
        let shared = ReplayedPool {
            flags: POOL_SHARED,
            uuid: Uuid::from_bytes([5; 16]),
            ..Default::default()
        };
        r.clients.insert(
            1,
            BTreeMap::from([(0, p), (3, shared), (4, ReplayedPool::default())]),
        );
        r.clients.insert(2, BTreeMap::new());
        for i in 0..10u16 {
            r.pending.entry(1 + u32::from(i % 2)).or_default().insert(
                (i % 3, i.wrapping_mul(7919), i as u8),
                Pending {
                    tag: u64::from(i) << 40,
                    opcode: [OPCODE_NEW_POOL, OPCODE_RESERVE, OPCODE_RESET][usize::from(i % 3)],
                    asked: i as u8,
                    value: u64::MAX - u64::from(i),
                },
            );
        }
        r
    }

    fn path() -> &'static Path {
        Path::new("/state/d1.snap")
    }

    #[test]
    fn a_snapshot_round_trips_with_its_pending_operations() {
        let r = sample();
        let b = encode(11, 2, &r);
        let s = decode(path(), &b).unwrap();
        assert_eq!((s.epoch, s.domain), (11, 2));
        assert_eq!(s.state.contents, r.contents);
        assert_eq!(s.state.clients, r.clients);
        assert_eq!(s.state.pending, r.pending);
        assert_eq!(
            s.state.pending.values().map(BTreeMap::len).sum::<usize>(),
            10
        );
        // Dense blocks: 7 + 1 pages, 3 contents, in a few hundred bytes.
        assert!(b.len() < 32 + 3 * 11 + 300 + 10 * 28, "{}", b.len());
    }

    #[test]
    fn a_snapshot_is_written_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d1.snap");
        write_snapshot(&p, 1, 2, &sample()).unwrap();
        // A crash in the middle of the next leaves a `.new` behind; the
        // next write replaces it, and until the rename the old one holds.
        let new = dir.path().join("d1.snap.new");
        fs::write(&new, b"half").unwrap();
        assert_eq!(read_snapshot(&p).unwrap().epoch, 1);
        write_snapshot(&p, 3, 2, &Replayed::default()).unwrap();
        assert!(!new.exists());
        let s = read_snapshot(&p).unwrap();
        assert_eq!((s.epoch, s.state), (3, Replayed::default()));
        let e = read_snapshot(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("No such file"), "{e}");
    }

    /// Every cut and every flipped byte is an error, never a panic.
    #[test]
    fn every_truncation_and_flipped_byte_is_an_error_naming_the_file() {
        let b = encode(11, 2, &sample());
        for n in 0..b.len() {
            let e = decode(path(), &b[..n]).unwrap_err().to_string();
            assert!(e.starts_with("snapshot /state/d1.snap: "), "{n}: {e}");
        }
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0x41;
            let e = decode(path(), &x).unwrap_err().to_string();
            assert!(e.starts_with("snapshot /state/d1.snap: "), "{i}: {e}");
        }
        assert_eq!(
            decode(path(), b"VTMEMIMG and more")
                .unwrap_err()
                .to_string(),
            "snapshot /state/d1.snap: not a vtmem snapshot (bad magic)"
        );
    }

    /// Contents that pass the checksum but make no sense (a bug or a
    /// forged file) are errors too.
    #[test]
    fn checked_nonsense_is_an_error() {
        let forge = |r: &Replayed| decode(path(), &encode(1, 1, r)).unwrap_err().to_string();
        let mut r = sample();
        r.clients
            .get_mut(&1)
            .unwrap()
            .get_mut(&0)
            .unwrap()
            .pages
            .insert((ObjectId([0; 3]), 0), 99);
        assert_eq!(
            forge(&r),
            "snapshot /state/d1.snap: client 1: pool 0: a page of unknown content entry 99"
        );
        let mut r = sample();
        r.clients.get_mut(&1).unwrap().get_mut(&4).unwrap().reserved = 1;
        assert_eq!(
            forge(&r),
            "snapshot /state/d1.snap: client 1: pool 4 is ephemeral but has pages or a reservation"
        );
        let mut r = sample();
        r.clients
            .get_mut(&1)
            .unwrap()
            .insert(16, ReplayedPool::default());
        assert_eq!(
            forge(&r),
            "snapshot /state/d1.snap: client 1: pool id 16 out of range"
        );
        let mut r = sample();
        r.contents.insert(
            8,
            Stored::Slot {
                addr: 0,
                len: 17,
                form: Form::Raw,
            },
        );
        assert_eq!(
            forge(&r),
            "snapshot /state/d1.snap: content entry 8: 17 bytes"
        );
        let mut r = sample();
        if let Some(p) = r.pending.get_mut(&2).and_then(|t| t.values_mut().next()) {
            p.opcode = 3;
        }
        assert_eq!(
            forge(&r),
            "snapshot /state/d1.snap: client 2: a pending operation of opcode 3"
        );
        // A count larger than the file.
        let mut b = encode(1, 1, &Replayed::default());
        b[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        let n = b.len() - 8;
        let check = xxh3_64(&b[..n]);
        b[n..].copy_from_slice(&check.to_le_bytes());
        assert_eq!(
            decode(path(), &b).unwrap_err().to_string(),
            "snapshot /state/d1.snap: 4294967295 contents: more than the file holds"
        );
    }
}
