// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A client's image: what one VM holds, as a stream another store can take
//! in (live migration moves it as the vhost-user device state).
//!
//! The format is specified in docs/protocol.md ("Device state"); in short:
//!
//! ```text
//! prefix  "VTMEMIMG" | version u32 | flags u32                   16 bytes
//! frame   kind u8 | 0 u8 x3 | len u32 | payload[len] | xxh3-64 u64
//!         POOL  (1): id u32 | flags u32 | uuid [16] | reserved u64
//!         PAGES (2): pool u32 | count u32 | count x page
//!                    page: object [u64; 3] | index u64 | kind u8 | 0 u8
//!                          | len u16 | body[len]
//!         END   (3): pools u32 | 0 u32 | pages u64 | stream bytes u64
//! ```
//!
//! Integers are little-endian; the checksum covers the frame's kind, zero
//! bytes, length and payload. Every pool comes (as a POOL frame) before its
//! pages. Persistent pages travel in their stored form (no recompression):
//! zero pages as a kind alone, same-filled pages as their pattern, others
//! as the LZ4 block or the raw page the store holds. Ephemeral pools travel
//! without their pages: they may lose pages at any time anyway.
//!
//! An import is all or nothing: it starts by dropping whatever the client
//! held, checks every frame and every page (an LZ4 block must decompress to
//! exactly one page) and charges every page and reservation as a put and a
//! `RESERVE` would (quota, host limit, eviction of ephemeral pages); on any
//! failure it drops everything it stored. A stream is bounded: frames of at
//! most [`MAX_FRAME`] bytes, and nothing is kept but what the store charges.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vtmem_protocol::{
    Handle, ObjectId, PoolSpec, Uuid, MAX_POOLS_PER_CLIENT, PAGE_SIZE, POOL_EXCLUSIVE_GETS,
    POOL_PERSISTENT, POOL_SHARED,
};

use super::client::DataHandle;
use super::content::{fill_pattern, NewData, Stored, ID_MASK, LZ4_BOUND, ZERO_REF};
use super::pool::Pool;
use super::{Page, TmemError};

/// First bytes of an image.
pub const IMAGE_MAGIC: [u8; 8] = *b"VTMEMIMG";
/// The one version this store writes and reads.
pub const IMAGE_VERSION: u32 = 1;
/// Largest frame payload a reader accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// Pages after which a writer ends a PAGES frame (at the next block of 16:
/// at most 79 pages, 327 KiB if every one is raw).
const PAGES_PER_FRAME: usize = 64;

const POOL_FRAME: u8 = 1;
const PAGES_FRAME: u8 = 2;
const END_FRAME: u8 = 3;

const PAGE_ZERO: u8 = 0;
const PAGE_PATTERN: u8 = 1;
const PAGE_LZ4: u8 = 2;
const PAGE_RAW: u8 = 3;

/// Bytes of a page record before its body.
const PAGE_HEADER: usize = 24 + 8 + 4;

/// Why an image could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("device state I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("not a vtmem device state (bad magic)")]
    BadMagic,
    #[error(
        "device state version {0} is not supported (this vtmemd reads version {IMAGE_VERSION})"
    )]
    Version(u32),
    #[error("device state is truncated")]
    Truncated,
    #[error("device state frame {frame} fails its checksum")]
    Checksum { frame: u64 },
    #[error("device state is malformed: {0}")]
    Malformed(&'static str),
    #[error("cannot take pool {pool}: {error}")]
    Pool { pool: u32, error: TmemError },
    #[error("cannot take a page of pool {pool}: {error}")]
    Page { pool: u32, error: TmemError },
    #[error("cannot read the VM's pages: {0}")]
    Export(TmemError),
}

/// What an image held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageSummary {
    /// Pools (of every kind).
    pub pools: u32,
    /// Pages (persistent pools').
    pub pages: u64,
    /// Bytes of the stream.
    pub bytes: u64,
}

/// Writes frames, counting bytes.
struct FrameWriter<'w, W: Write> {
    out: &'w mut W,
    bytes: u64,
}

impl<W: Write> FrameWriter<'_, W> {
    fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn frame(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let mut head = [0u8; 8];
        head[0] = kind;
        // Payloads are at most PAGES_PER_FRAME + 15 pages, far below 4 GiB.
        head[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&head);
        h.update(payload);
        self.raw(&head)?;
        self.raw(payload)?;
        self.raw(&h.digest().to_le_bytes())
    }
}

/// A pool's flags: `NEW_POOL`'s bits (protocol.md section 10.1).
fn pool_flags(p: &Pool) -> u32 {
    let spec = PoolSpec {
        persistent: p.persistent,
        exclusive_gets: p.exclusive_gets,
        shared: p.shared,
    };
    u32::from(spec.flags())
}

fn put_page(buf: &mut Vec<u8>, obj: &ObjectId, index: u64, kind: u8, body: &[u8]) {
    for w in &obj.0 {
        buf.extend_from_slice(&w.to_le_bytes());
    }
    buf.extend_from_slice(&index.to_le_bytes());
    buf.push(kind);
    buf.push(0);
    // Bodies are at most one page.
    buf.extend_from_slice(&(body.len() as u16).to_le_bytes());
    buf.extend_from_slice(body);
}

impl DataHandle {
    /// Writes this client's image to `out`: every pool, and every page of
    /// its persistent pools in stored form.
    ///
    /// Meant for a client whose device is stopped (its guest sends nothing
    /// meanwhile); pages stored or dropped during the export may or may
    /// not be in it. Nothing here changes the client.
    pub fn export_image(&self, out: &mut impl Write) -> Result<ImageSummary, ImageError> {
        let pools: Vec<(u32, Arc<Pool>)> = {
            let table = self.client.table.read();
            if table.removed {
                return Err(ImageError::Export(TmemError::ClientGone));
            }
            table
                .pools
                .iter()
                .enumerate()
                .filter_map(|(i, p)| Some((i as u32, p.clone()?)))
                .collect()
        };
        let mut w = FrameWriter { out, bytes: 0 };
        let mut prefix = [0u8; 16];
        prefix[..8].copy_from_slice(&IMAGE_MAGIC);
        prefix[8..12].copy_from_slice(&IMAGE_VERSION.to_le_bytes());
        w.raw(&prefix)?;

        for (id, p) in &pools {
            let mut rec = Vec::with_capacity(32);
            rec.extend_from_slice(&id.to_le_bytes());
            rec.extend_from_slice(&pool_flags(p).to_le_bytes());
            rec.extend_from_slice(
                p.shared
                    .as_ref()
                    .map_or(&[0u8; 16], Uuid::as_bytes)
                    .as_slice(),
            );
            rec.extend_from_slice(&p.reserved.load(Ordering::Acquire).to_le_bytes());
            w.frame(POOL_FRAME, &rec)?;
        }

        let mut pages = 0u64;
        let mut buf = Vec::new();
        for (id, p) in pools.iter().filter(|(_, p)| p.persistent) {
            let mut cursor = Some(0);
            while let Some(from) = cursor {
                buf.clear();
                buf.extend_from_slice(&id.to_le_bytes());
                buf.extend_from_slice(&0u32.to_le_bytes());
                let mut count = 0u32;
                let mut corrupt = false;
                {
                    let idx = p.lock();
                    cursor = idx.pages.visit(from, PAGES_PER_FRAME, |obj, index, v| {
                        let id = v & ID_MASK;
                        if id == ZERO_REF {
                            put_page(&mut buf, obj, index, PAGE_ZERO, &[]);
                        } else {
                            let res = p.domain.with_stored(id, |stored| match stored {
                                Stored::Pattern(w) => {
                                    put_page(&mut buf, obj, index, PAGE_PATTERN, &w.to_le_bytes())
                                }
                                Stored::Lz4(b) => put_page(&mut buf, obj, index, PAGE_LZ4, b),
                                Stored::Raw(b) => put_page(&mut buf, obj, index, PAGE_RAW, b),
                            });
                            corrupt |= res.is_err();
                        }
                        count += 1;
                    });
                }
                if corrupt {
                    return Err(ImageError::Export(TmemError::Busy(
                        "stored page is corrupt",
                    )));
                }
                if count > 0 {
                    buf[4..8].copy_from_slice(&count.to_le_bytes());
                    w.frame(PAGES_FRAME, &buf)?;
                    pages += u64::from(count);
                }
            }
        }

        let mut end = Vec::with_capacity(24);
        end.extend_from_slice(&(pools.len() as u32).to_le_bytes());
        end.extend_from_slice(&0u32.to_le_bytes());
        end.extend_from_slice(&pages.to_le_bytes());
        // The stream's bytes before this frame.
        end.extend_from_slice(&w.bytes.to_le_bytes());
        w.frame(END_FRAME, &end)?;
        w.out.flush()?;
        Ok(ImageSummary {
            pools: pools.len() as u32,
            pages,
            bytes: w.bytes,
        })
    }

    /// Replaces everything this client holds with the image read from
    /// `input`; all or nothing (on error the client holds nothing).
    pub fn import_image(&self, input: &mut impl Read) -> Result<ImageSummary, ImageError> {
        self.reset();
        let res = self.import_inner(input);
        if res.is_err() {
            self.reset();
        }
        res
    }

    fn import_inner(&self, input: &mut impl Read) -> Result<ImageSummary, ImageError> {
        let mut r = FrameReader {
            input,
            bytes: 0,
            frames: 0,
        };
        let mut prefix = [0u8; 16];
        r.exact(&mut prefix)?;
        if prefix[..8] != IMAGE_MAGIC {
            return Err(ImageError::BadMagic);
        }
        let version = u32::from_le_bytes(word(&prefix[8..12]));
        if version != IMAGE_VERSION {
            return Err(ImageError::Version(version));
        }
        if prefix[12..16] != [0; 4] {
            return Err(ImageError::Malformed("unknown flags"));
        }

        let mut declared = [false; MAX_POOLS_PER_CLIENT as usize];
        let mut pools = 0u32;
        let mut pages = 0u64;
        let mut payload = Vec::new();
        let mut scratch = [0u8; LZ4_BOUND];
        loop {
            let before = r.bytes;
            let kind = r.frame(&mut payload)?;
            match kind {
                POOL_FRAME => {
                    let (id, spec, reserved) = parse_pool(&payload)?;
                    let slot = declared
                        .get_mut(id as usize)
                        .ok_or(ImageError::Malformed("pool id out of range"))?;
                    if std::mem::replace(slot, true) {
                        return Err(ImageError::Malformed("pool declared twice"));
                    }
                    self.reopen_pool(id, spec)
                        .and_then(|()| self.reinstate_reservation(id, reserved))
                        .map_err(|error| ImageError::Pool { pool: id, error })?;
                    pools += 1;
                }
                PAGES_FRAME => {
                    pages += self.import_pages(&payload, &declared, &mut scratch)?;
                }
                END_FRAME => {
                    if payload.len() != 24 {
                        return Err(ImageError::Malformed("end frame of the wrong size"));
                    }
                    let want_pools = u32::from_le_bytes(word(&payload[0..4]));
                    let want_pages = u64::from_le_bytes(dword(&payload[8..16]));
                    let want_bytes = u64::from_le_bytes(dword(&payload[16..24]));
                    if want_pools != pools || want_pages != pages || want_bytes != before {
                        return Err(ImageError::Malformed("end frame does not match the stream"));
                    }
                    let mut extra = [0u8; 1];
                    if r.input.read(&mut extra)? != 0 {
                        return Err(ImageError::Malformed("bytes after the end frame"));
                    }
                    return Ok(ImageSummary {
                        pools,
                        pages,
                        bytes: r.bytes,
                    });
                }
                _ => return Err(ImageError::Malformed("unknown frame kind")),
            }
        }
    }

    /// Opens pool `id` as `spec` describes (an imported pool keeps its id).
    fn reopen_pool(&self, id: u32, spec: PoolSpec) -> Result<(), TmemError> {
        let mut table = self.client.table.write();
        if table.removed {
            return Err(TmemError::ClientGone);
        }
        if table.pools.get(id as usize).is_none_or(Option::is_some) {
            return Err(TmemError::Invalid("pool id taken"));
        }
        if let Some(uuid) = spec.shared {
            if table
                .pools
                .iter()
                .any(|p| p.as_ref().is_some_and(|p| p.shared == Some(uuid)))
            {
                return Err(TmemError::Invalid("shared pool open twice"));
            }
            if !self.authorized(&uuid) {
                return Err(TmemError::NotAuthorized);
            }
        }
        self.open_pool(&mut table, id as usize, spec, true, None);
        Ok(())
    }

    /// Stores the pages of one PAGES frame; returns how many.
    fn import_pages(
        &self,
        payload: &[u8],
        declared: &[bool],
        scratch: &mut [u8; LZ4_BOUND],
    ) -> Result<u64, ImageError> {
        let head = payload
            .get(..8)
            .ok_or(ImageError::Malformed("pages frame too short"))?;
        let pool_id = u32::from_le_bytes(word(&head[0..4]));
        let count = u32::from_le_bytes(word(&head[4..8]));
        if !declared.get(pool_id as usize).copied().unwrap_or(false) {
            return Err(ImageError::Malformed("pages of an undeclared pool"));
        }
        let pool = {
            let table = self.client.table.read();
            table
                .pools
                .get(pool_id as usize)
                .and_then(Clone::clone)
                .ok_or(ImageError::Page {
                    pool: pool_id,
                    error: TmemError::NoPool,
                })?
        };
        let mut rest = &payload[8..];
        let mut page: Page = [0u8; PAGE_SIZE];
        for _ in 0..count {
            let (rec, body, tail) = split_page(rest)?;
            rest = tail;
            let handle = Handle {
                pool: pool_id,
                object: rec.0,
                index: rec.1,
            };
            let given = match rec.2 {
                PAGE_ZERO if body.is_empty() => {
                    page.fill(0);
                    None
                }
                PAGE_PATTERN if body.len() == 8 => {
                    fill_pattern(&mut page, u64::from_le_bytes(dword(body)));
                    None
                }
                PAGE_LZ4 if !body.is_empty() && body.len() < PAGE_SIZE => {
                    match lz4_flex::block::decompress_into(body, &mut page) {
                        Ok(PAGE_SIZE) => Some(NewData::Lz4(body)),
                        _ => return Err(ImageError::Malformed("a page does not decompress")),
                    }
                }
                PAGE_RAW if body.len() == PAGE_SIZE => {
                    page.copy_from_slice(body);
                    Some(NewData::Raw)
                }
                _ => return Err(ImageError::Malformed("bad page kind or length")),
            };
            self.put_inner(&pool, &handle, &page, false, scratch, given)
                .map_err(|error| ImageError::Page {
                    pool: pool_id,
                    error,
                })?;
        }
        if !rest.is_empty() {
            return Err(ImageError::Malformed("pages frame longer than its pages"));
        }
        Ok(u64::from(count))
    }
}

fn word(b: &[u8]) -> [u8; 4] {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    w
}

fn dword(b: &[u8]) -> [u8; 8] {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    w
}

/// A POOL frame: id, spec, reserved pages.
fn parse_pool(p: &[u8]) -> Result<(u32, PoolSpec, u64), ImageError> {
    if p.len() != 32 {
        return Err(ImageError::Malformed("pool frame of the wrong size"));
    }
    let id = u32::from_le_bytes(word(&p[0..4]));
    let flags = u8::try_from(u32::from_le_bytes(word(&p[4..8])))
        .ok()
        .filter(|f| f & !(POOL_PERSISTENT | POOL_SHARED | POOL_EXCLUSIVE_GETS) == 0)
        .ok_or(ImageError::Malformed("unknown pool flags"))?;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&p[8..24]);
    let reserved = u64::from_le_bytes(dword(&p[24..32]));
    let persistent = flags & POOL_PERSISTENT != 0;
    let shared = if flags & POOL_SHARED != 0 {
        if persistent {
            return Err(ImageError::Malformed("a shared pool must be ephemeral"));
        }
        Some(Uuid::from_bytes(uuid).ok_or(ImageError::Malformed("a shared pool needs a UUID"))?)
    } else {
        if uuid != [0; 16] {
            return Err(ImageError::Malformed("a private pool has a UUID"));
        }
        None
    };
    if reserved != 0 && !persistent {
        return Err(ImageError::Malformed("reservations in an ephemeral pool"));
    }
    let spec = PoolSpec {
        persistent,
        exclusive_gets: flags & POOL_EXCLUSIVE_GETS != 0,
        shared,
    };
    Ok((id, spec, reserved))
}

/// One page record: ((object, index, kind), body, the rest).
#[allow(clippy::type_complexity)]
fn split_page(b: &[u8]) -> Result<((ObjectId, u64, u8), &[u8], &[u8]), ImageError> {
    if b.len() < PAGE_HEADER {
        return Err(ImageError::Malformed("page record cut short"));
    }
    let object = [
        u64::from_le_bytes(dword(&b[0..8])),
        u64::from_le_bytes(dword(&b[8..16])),
        u64::from_le_bytes(dword(&b[16..24])),
    ];
    let index = u64::from_le_bytes(dword(&b[24..32]));
    let kind = b[32];
    if b[33] != 0 {
        return Err(ImageError::Malformed("page record reserved byte set"));
    }
    let len = usize::from(u16::from_le_bytes([b[34], b[35]]));
    let body = b
        .get(PAGE_HEADER..PAGE_HEADER + len)
        .ok_or(ImageError::Malformed("page record cut short"))?;
    Ok((
        (ObjectId(object), index, kind),
        body,
        &b[PAGE_HEADER + len..],
    ))
}

/// Reads and checks frames, counting bytes.
struct FrameReader<'r, R: Read> {
    input: &'r mut R,
    bytes: u64,
    frames: u64,
}

impl<R: Read> FrameReader<'_, R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), ImageError> {
        match self.input.read_exact(buf) {
            Ok(()) => {
                self.bytes += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ImageError::Truncated),
            Err(e) => Err(ImageError::Io(e)),
        }
    }

    /// The next frame's kind, its payload in `payload`.
    fn frame(&mut self, payload: &mut Vec<u8>) -> Result<u8, ImageError> {
        let mut head = [0u8; 8];
        self.exact(&mut head)?;
        if head[1..4] != [0; 3] {
            return Err(ImageError::Malformed("frame reserved bytes set"));
        }
        let len = u32::from_le_bytes(word(&head[4..8])) as usize;
        if len > MAX_FRAME {
            return Err(ImageError::Malformed("frame larger than the limit"));
        }
        payload.resize(len, 0);
        self.exact(payload)?;
        let mut sum = [0u8; 8];
        self.exact(&mut sum)?;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&head);
        h.update(payload);
        let frame = self.frames;
        self.frames += 1;
        if h.digest() != u64::from_le_bytes(sum) {
            return Err(ImageError::Checksum { frame });
        }
        Ok(head[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_records_round_trip() {
        let mut buf = Vec::new();
        put_page(&mut buf, &ObjectId([1, 2, 3]), 77, PAGE_LZ4, &[9, 8, 7]);
        put_page(&mut buf, &ObjectId([4, 5, 6]), 78, PAGE_ZERO, &[]);
        let (rec, body, rest) = split_page(&buf).unwrap();
        assert_eq!(rec, (ObjectId([1, 2, 3]), 77, PAGE_LZ4));
        assert_eq!(body, &[9, 8, 7]);
        let (rec, body, rest) = split_page(rest).unwrap();
        assert_eq!(rec, (ObjectId([4, 5, 6]), 78, PAGE_ZERO));
        assert!(body.is_empty() && rest.is_empty());
        // A record whose length runs past the buffer is refused.
        assert!(split_page(&buf[..PAGE_HEADER + 2]).is_err());
        assert!(split_page(&buf[..PAGE_HEADER - 1]).is_err());
    }

    #[test]
    fn pool_frames_are_checked() {
        let mut p = [0u8; 32];
        p[4] = POOL_PERSISTENT;
        p[24] = 5;
        let (id, spec, reserved) = parse_pool(&p).unwrap();
        assert_eq!((id, spec.persistent, reserved), (0, true, 5));
        // Shared persistent, unknown flags, reserved ephemeral, UUID on a
        // private pool, wrong size.
        let mut bad = p;
        bad[4] = POOL_PERSISTENT | POOL_SHARED;
        assert!(parse_pool(&bad).is_err());
        bad[4] = 0x80;
        assert!(parse_pool(&bad).is_err());
        bad[4] = 0;
        assert!(parse_pool(&bad).is_err());
        let mut bad = p;
        bad[8] = 1;
        assert!(parse_pool(&bad).is_err());
        assert!(parse_pool(&p[..31]).is_err());
    }
}
