// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The data path of one VM under a hostile guest: descriptor tables, rings,
//! requests and page buffers built from the fuzz input in a real guest
//! memory with holes, drained by the real device loop
//! (`VtmemBackend::handle_event`: the chain walk, the request parser, the
//! executor, the used ring and notifications) against a real store.
//!
//! A second VM (the neighbour) shares the store and the dedup group and is
//! loaded with pages whose bytes come from a per-process secret the fuzzer
//! never sees. After each input, and after every kick in it:
//!
//! - nothing panicked (a panic aborts the process);
//! - the store is within its host limit;
//! - no 16-byte window of any of the neighbour's pages appears in the
//!   fuzzed guest's memory: the guest cannot have written one itself, so
//!   one there came from the neighbour. A page written by a GET is cut into
//!   at most 128 pieces, one of them at least 32 bytes long, which holds a
//!   16-byte window at a 16-byte aligned guest address: checking those
//!   finds any leaked page, whatever its arrangement;
//! - the neighbour's persistent pages are all there, unchanged, and its
//!   shared pool (which the fuzzed VM may not join) holds its own pages or
//!   nothing.
#![no_main]

use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vtmem_backend::config::DeviceSettings;
use vtmem_backend::device::{GuestRam, VtmemBackend};
use vtmem_backend::exec::DeviceCounters;
use vtmem_backend::ratelimit::RateLimitedLog;
use vtmem_protocol::{
    request_len, response_len, Handle, ObjectId, PoolSpec, Uuid, MAX_OPS_PER_REQUEST, OP_DESC_SIZE,
    PAGE_SIZE, REQUEST_HEADER_SIZE, VTMEM_F_EPHEMERAL, VTMEM_F_MQ, VTMEM_F_RESERVE, VTMEM_F_SHARED,
};
use vtmem_store::{AdminHandle, ClientConfig, DataHandle, Page, Store, StoreConfig};

/// Guest memory: two adjacent regions (a buffer may cross from one to the
/// other), holes, and a region at the top of the address space (so that
/// address arithmetic overflows: it ends 4 KiB below 2^64).
const REGIONS: [(u64, usize); 5] = [
    (0x0, 0x4000),
    (0x4000, 0xc000),
    (0x2_0000, 0x1_0000),
    (0x10_0000, 0x8000),
    (0xffff_ffff_ffff_7000, 0x8000),
];
/// Where the builder puts buffers: `(start, end)`, each one span of
/// memory (the first crosses from region 0 into region 1).
const ARENAS: [(u64, u64); 4] = [
    (0x3000, 0x1_0000),
    (0x2_0000, 0x3_0000),
    (0x10_0000, 0x10_8000),
    (0xffff_ffff_ffff_7000, 0xffff_ffff_ffff_f000),
];
/// The split ring: descriptor table, available ring, used ring (region 0).
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const MAX_QUEUE_SIZE: u16 = 256;

/// UUIDs of shared pools: the fuzzed VM may join `MINE_A` and `MINE_B`;
/// the neighbour holds `NEIGHBOUR` (with secret pages) and `MINE_A`.
const MINE_A: [u8; 16] = *b"vtmem-fuzz-pool1";
const MINE_B: [u8; 16] = *b"vtmem-fuzz-pool2";
const NEIGHBOUR: [u8; 16] = *b"vtmem-neighbour!";

/// The neighbour's pages: persistent (must survive), ephemeral (may be
/// evicted), in its shared pool. Object 0 and 1, indices 0.., as a guest
/// would use them: the fuzzed VM addresses the same handles in its pools.
const NEIGHBOUR_PERSISTENT: u64 = 2;
const NEIGHBOUR_EPHEMERAL: u64 = 1;
const NEIGHBOUR_SHARED: u64 = 1;
const NEIGHBOUR_PAGES: u64 = NEIGHBOUR_PERSISTENT + NEIGHBOUR_EPHEMERAL + NEIGHBOUR_SHARED;

/// Window length of the leak check.
const WINDOW: usize = 16;
/// A secret page is one random block repeated: it compresses (so that
/// storing it costs little time per input), and every window of it is
/// still secret.
const SECRET_BLOCK: usize = 512;

#[derive(Debug, Arbitrary)]
struct Input {
    /// Bit 0 ephemeral, 1 shared, 2 reserve, 3 indirect, 4 event idx.
    features: u8,
    /// Queue size `1 << (queue_shift % 9)`.
    queue_shift: u8,
    /// Host limit above what the neighbour holds, in KiB.
    host_room_kib: u16,
    /// Quotas of the fuzzed VM in KiB (None: unlimited).
    persistent_quota_kib: Option<u16>,
    ephemeral_quota_kib: Option<u16>,
    /// Start as a driver does: RESET, then a persistent, an ephemeral and
    /// a shared pool (ids 0, 1, 2 when the features allow them).
    init: bool,
    steps: Vec<Step>,
}

#[derive(Debug, Arbitrary)]
enum Step {
    /// A request built from operations, cut into buffers and linked.
    Chain(ChainSpec),
    /// One entry of the descriptor table.
    Desc { index: u16, desc: RawDesc },
    /// An indirect table (or anything else) of raw descriptors.
    Table { at: Place, descs: Vec<RawDesc> },
    /// Raw bytes anywhere (rings included).
    Bytes { at: Place, bytes: Vec<u8> },
    /// Makes a head available.
    Avail(u16),
    /// Sets the available index.
    AvailIdx(u16),
    /// The driver kicks: the device drains the queue.
    Kick,
    /// The VMM changes the fuzzed VM through the control API.
    Admin(Admin),
}

#[derive(Debug, Arbitrary)]
enum Admin {
    Freeze,
    Thaw,
    Quota {
        persistent_kib: Option<u16>,
        ephemeral_kib: Option<u16>,
    },
    FlushAll {
        ephemeral_only: bool,
    },
    Weight(u8),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Place {
    /// In an arena, at an offset (modulo its size).
    Arena { arena: u8, offset: u16 },
    /// Near region `region`'s end, `back` bytes before it (so past it too).
    End { region: u8, back: i8 },
    /// Any address.
    Raw(u64),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
struct RawDesc {
    addr: Place,
    len: Len,
    flags: u8,
    next: u16,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Len {
    Page,
    Small(u8),
    Raw(u32),
}

#[derive(Debug, Arbitrary)]
struct ChainSpec {
    ops: Vec<FuzzOp>,
    tag: u64,
    /// Where the readable and writable parts are cut into buffers.
    read_cuts: Vec<u16>,
    write_cuts: Vec<u16>,
    /// Arena of the buffers.
    arena: u8,
    /// Through one indirect table.
    indirect: bool,
    /// What makes the chain malformed, if anything.
    mangle: Option<Mangle>,
}

#[derive(Debug, Arbitrary)]
struct Mangle {
    /// Bytes of the request changed after encoding: (offset, value).
    patch: Vec<(u16, u8)>,
    /// Bytes added to or taken from the readable and writable parts.
    read_delta: i8,
    write_delta: i8,
    /// Descriptors in chain order, but the writable ones first.
    swap_directions: bool,
}

/// A pool id, object or index: mostly one of the first few (so that
/// operations meet the pools and pages earlier ones made), else any.
fn small(v: u8, few: u8) -> u64 {
    if v >= 0xf0 {
        u64::from(v)
    } else {
        u64::from(v % few)
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
struct H {
    pool: u8,
    object: u8,
    index: u8,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum UuidSel {
    None,
    MineA,
    MineB,
    Neighbour,
    Raw([u8; 16]),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Content {
    Zero,
    Fill(u8),
    Word(u64),
    Text(u8),
    Noise(u16),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum FuzzOp {
    NewPool {
        flags: u8,
        uuid: UuidSel,
        shift: Option<u8>,
    },
    DestroyPool {
        pool: u8,
    },
    Put {
        h: H,
        reserved: bool,
        content: Content,
    },
    Get {
        h: H,
    },
    FlushPage {
        h: H,
    },
    FlushObject {
        pool: u8,
        object: u8,
    },
    Reserve {
        pool: u8,
        pages: u16,
    },
    Unreserve {
        pool: u8,
        pages: u16,
    },
    Reset,
    /// Any 48 bytes (a page follows if the first one is 3, PUT).
    Raw {
        bytes: [u8; OP_DESC_SIZE],
        content: Content,
    },
}

/// `(opcode, flags, pool, object, index, arg)`.
type Fields = (u8, u8, u32, [u64; 3], u64, u64);

impl FuzzOp {
    fn encode(&self) -> [u8; OP_DESC_SIZE] {
        let pool = |p: &u8| small(*p, 4) as u32;
        let handle = |h: &H| (pool(&h.pool), [small(h.object, 3), 0, 0], small(h.index, 8));
        let f: Fields = match self {
            FuzzOp::NewPool { flags, uuid, shift } => {
                let b = match uuid {
                    UuidSel::None => [0; 16],
                    UuidSel::MineA => MINE_A,
                    UuidSel::MineB => MINE_B,
                    UuidSel::Neighbour => NEIGHBOUR,
                    UuidSel::Raw(b) => *b,
                };
                let lo = u64::from_le_bytes(b[..8].try_into().unwrap());
                let hi = u64::from_le_bytes(b[8..].try_into().unwrap());
                let shift = shift.map_or(12, u64::from);
                // The defined flags mostly, any byte sometimes.
                let flags = if *flags >= 0xf0 { *flags } else { *flags & 7 };
                (1, flags, 0, [lo, hi, 0], 0, shift)
            }
            FuzzOp::DestroyPool { pool: p } => (2, 0, pool(p), [0; 3], 0, 0),
            FuzzOp::Put { h, reserved, .. } => {
                let (p, o, i) = handle(h);
                (3, u8::from(*reserved), p, o, i, 0)
            }
            FuzzOp::Get { h } => {
                let (p, o, i) = handle(h);
                (4, 0, p, o, i, 0)
            }
            FuzzOp::FlushPage { h } => {
                let (p, o, i) = handle(h);
                (5, 0, p, o, i, 0)
            }
            FuzzOp::FlushObject { pool: p, object } => {
                (6, 0, pool(p), [small(*object, 3), 0, 0], 0, 0)
            }
            FuzzOp::Reserve { pool: p, pages } => (7, 0, pool(p), [0; 3], 0, u64::from(*pages)),
            FuzzOp::Unreserve { pool: p, pages } => (8, 0, pool(p), [0; 3], 0, u64::from(*pages)),
            FuzzOp::Reset => (9, 0, 0, [0; 3], 0, 0),
            FuzzOp::Raw { bytes, .. } => return *bytes,
        };
        let (opcode, flags, pool, object, index, arg) = f;
        let mut b = [0u8; OP_DESC_SIZE];
        b[0] = opcode;
        b[1] = flags;
        b[4..8].copy_from_slice(&pool.to_le_bytes());
        for (i, w) in object.iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        b[32..40].copy_from_slice(&index.to_le_bytes());
        b[40..48].copy_from_slice(&arg.to_le_bytes());
        b
    }

    /// The content of this operation's PUT page, if the opcode byte makes
    /// it take one.
    fn put_page(&self) -> Option<Content> {
        match self {
            FuzzOp::Put { content, .. } => Some(*content),
            FuzzOp::Raw { bytes, content } if bytes[0] == 3 => Some(*content),
            _ => None,
        }
    }

    fn takes_get_page(&self) -> bool {
        match self {
            FuzzOp::Get { .. } => true,
            FuzzOp::Raw { bytes, .. } => bytes[0] == 4,
            _ => false,
        }
    }
}

impl Content {
    fn fill(&self, page: &mut [u8]) {
        match *self {
            Content::Zero => page.fill(0),
            Content::Fill(b) => page.fill(b),
            Content::Word(w) => {
                for c in page.chunks_exact_mut(8) {
                    c.copy_from_slice(&w.to_le_bytes());
                }
            }
            Content::Text(seed) => {
                for (i, b) in page.iter_mut().enumerate() {
                    *b = b"vtmem fuzz page "[(i + usize::from(seed)) % 16] ^ ((i / 512) as u8);
                }
            }
            Content::Noise(seed) => {
                let mut x = u64::from(seed) | 0x1_0000;
                for c in page.chunks_exact_mut(8) {
                    x = splitmix(x);
                    c.copy_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A hasher for the leak check's windows, which are random already.
#[derive(Default)]
struct WindowHasher(u64);

impl Hasher for WindowHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type Windows = HashSet<u128, BuildHasherDefault<WindowHasher>>;

/// What lives as long as the process.
struct World {
    mem: GuestRam,
    /// The neighbour's pages, derived from a secret the fuzzer never sees.
    secret_pages: Vec<Box<Page>>,
    /// Every 16-byte window of those pages.
    windows: Windows,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let ranges: Vec<(GuestAddress, usize)> =
            REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        let mem = GuestRam::from_ranges(&ranges).expect("guest memory");
        // A new secret in every process: no corpus entry can hold it.
        let rs = std::collections::hash_map::RandomState::new();
        let mut x = rs.hash_one(0x7365_6372_6574_u64) ^ rs.hash_one(std::process::id());
        let secret_pages: Vec<Box<Page>> = (0..NEIGHBOUR_PAGES)
            .map(|_| {
                let mut block = [0u8; SECRET_BLOCK];
                for c in block.chunks_exact_mut(8) {
                    x = splitmix(x);
                    c.copy_from_slice(&x.to_le_bytes());
                }
                let mut p = Box::new([0u8; PAGE_SIZE]);
                for c in p.chunks_exact_mut(SECRET_BLOCK) {
                    c.copy_from_slice(&block);
                }
                p
            })
            .collect();
        let mut windows = Windows::default();
        for p in &secret_pages {
            for w in p.windows(WINDOW) {
                windows.insert(u128::from_le_bytes(w.try_into().unwrap()));
            }
        }
        World {
            mem,
            secret_pages,
            windows,
        }
    })
}

fn kib(k: Option<u16>) -> u64 {
    k.map_or(u64::MAX, |k| u64::from(k) << 10)
}

fn uuid(b: [u8; 16]) -> Uuid {
    Uuid::from_bytes(b).expect("not nil")
}

fn handle(pool: u32, object: u64, index: u64) -> Handle {
    Handle {
        pool,
        object: ObjectId([object, 0, 0]),
        index,
    }
}

/// The neighbour: its pools and its pages.
struct Neighbour {
    data: DataHandle,
    persistent: u32,
    shared: u32,
}

fn neighbour(store: &Arc<Store>, w: &World) -> Neighbour {
    let admin = store
        .add_client(
            "neighbour",
            ClientConfig {
                dedup_group: Some("fuzz".into()),
                authorized_uuids: vec![uuid(NEIGHBOUR), uuid(MINE_A)],
                ..ClientConfig::default()
            },
        )
        .expect("neighbour");
    let data = admin.data();
    let persistent = data.new_pool(PoolSpec::persistent()).expect("pool");
    let ephemeral = data.new_pool(PoolSpec::ephemeral()).expect("pool");
    let shared = data
        .new_pool(PoolSpec::shared(uuid(NEIGHBOUR)))
        .expect("pool");
    let open = data.new_pool(PoolSpec::shared(uuid(MINE_A))).expect("pool");
    let mut pages = w.secret_pages.iter();
    for i in 0..NEIGHBOUR_PERSISTENT {
        let p = pages.next().unwrap();
        data.put(&handle(persistent, i % 2, i), p, false)
            .expect("put");
    }
    for i in 0..NEIGHBOUR_EPHEMERAL {
        let p = pages.next().unwrap();
        data.put(&handle(ephemeral, 0, i), p, false).expect("put");
    }
    for i in 0..NEIGHBOUR_SHARED {
        let p = pages.next().unwrap();
        data.put(&handle(shared, 0, i), p, false).expect("put");
    }
    // A page the fuzzed VM may read: the shared pool both may join.
    let mut public = [0u8; PAGE_SIZE];
    Content::Text(1).fill(&mut public);
    data.put(&handle(open, 0, 0), &public, false).expect("put");
    Neighbour {
        data,
        persistent,
        shared,
    }
}

/// A bump allocator in the arenas.
struct Alloc {
    next: [u64; ARENAS.len()],
}

impl Alloc {
    fn new() -> Self {
        Alloc {
            next: ARENAS.map(|(start, _)| start),
        }
    }

    /// `len` bytes in arena `arena` (wrapping to its start when full).
    fn take(&mut self, arena: u8, len: u64) -> u64 {
        let a = usize::from(arena) % ARENAS.len();
        let (start, end) = ARENAS[a];
        let mut at = self.next[a];
        if end - at < len {
            at = start;
        }
        self.next[a] = at.saturating_add(len).saturating_add(1).min(end) & !1;
        at
    }
}

fn place(p: Place) -> u64 {
    match p {
        Place::Arena { arena, offset } => {
            let (start, end) = ARENAS[usize::from(arena) % ARENAS.len()];
            start + u64::from(offset) % (end - start)
        }
        Place::End { region, back } => {
            let (start, len) = REGIONS[usize::from(region) % REGIONS.len()];
            start
                .wrapping_add(len as u64)
                .wrapping_sub(i64::from(back) as u64)
        }
        Place::Raw(a) => a,
    }
}

fn len(l: Len) -> u32 {
    match l {
        Len::Page => PAGE_SIZE as u32,
        Len::Small(n) => u32::from(n),
        Len::Raw(n) => n,
    }
}

fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    b
}

/// The driver side of the ring.
struct Driver<'m> {
    mem: &'m GuestRam,
    size: u16,
    avail_idx: u16,
    next_desc: u16,
    alloc: Alloc,
}

impl Driver<'_> {
    fn write(&self, at: u64, bytes: &[u8]) {
        // Writes into holes fail, as they would for a guest.
        let _ = self.mem.write_slice(bytes, GuestAddress(at));
    }

    fn store_desc(&self, index: u16, d: [u8; 16]) {
        self.write(DESC_TABLE + u64::from(index) * 16, &d);
    }

    fn avail(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.write(AVAIL_RING + 4 + 2 * slot, &head.to_le_bytes());
        self.set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.write(AVAIL_RING + 2, &idx.to_le_bytes());
    }

    fn raw_desc(&self, d: &RawDesc) -> [u8; 16] {
        // Flags: WRITE, NEXT, INDIRECT from the low bits, anything from the rest.
        let f = u16::from(d.flags);
        let flags = (f & 1) * VRING_DESC_F_NEXT as u16
            | ((f >> 1) & 1) * VRING_DESC_F_WRITE as u16
            | ((f >> 2) & 1) * VRING_DESC_F_INDIRECT as u16
            | (f >> 3) << 3;
        desc_bytes(place(d.addr), len(d.len), flags, d.next)
    }

    /// Builds the chain of `spec`, makes it available.
    fn chain(&mut self, spec: &ChainSpec) {
        let ops = &spec.ops[..spec.ops.len().min(usize::from(MAX_OPS_PER_REQUEST) + 2)];
        let n = ops.len() as u16;
        // The readable part: header, operations, PUT pages.
        let mut readable = Vec::with_capacity(request_len(n) + PAGE_SIZE);
        readable.extend_from_slice(&1u16.to_le_bytes());
        readable.extend_from_slice(&n.to_le_bytes());
        readable.extend_from_slice(&[0; 4]);
        readable.extend_from_slice(&spec.tag.to_le_bytes());
        debug_assert_eq!(readable.len(), REQUEST_HEADER_SIZE);
        for op in ops {
            readable.extend_from_slice(&op.encode());
        }
        let (read_delta, write_delta, swap) = match &spec.mangle {
            Some(m) => {
                for &(at, v) in &m.patch {
                    if let Some(b) = readable.get_mut(usize::from(at)) {
                        *b = v;
                    }
                }
                (m.read_delta, m.write_delta, m.swap_directions)
            }
            None => (0, 0, false),
        };
        let mut page = [0u8; PAGE_SIZE];
        let mut gets = 0usize;
        for op in ops {
            if let Some(c) = op.put_page() {
                c.fill(&mut page);
                readable.extend_from_slice(&page);
            }
            gets += usize::from(op.takes_get_page());
        }
        let read_len = (readable.len() as i64 + i64::from(read_delta)).max(0) as usize;
        readable.resize(read_len, 0x5a);
        let write_len =
            (response_len(n) as i64 + (gets * PAGE_SIZE) as i64 + i64::from(write_delta)).max(0)
                as usize;

        // Cut both parts into buffers.
        let mut bufs: Vec<(u64, u32, bool)> = Vec::new();
        let arena = spec.arena;
        let mut cut = |total: usize, cuts: &[u16], writable: bool, bufs: &mut Vec<_>| {
            let mut points: Vec<usize> =
                cuts.iter().map(|&c| usize::from(c) % (total + 1)).collect();
            points.sort_unstable();
            let mut start = 0;
            for end in points.into_iter().chain(std::iter::once(total)) {
                let l = end - start;
                let at = self.alloc.take(arena, l as u64);
                if !writable {
                    self.write(at, &readable[start..end]);
                }
                bufs.push((at, l as u32, writable));
                start = end;
            }
        };
        if read_len > 0 || spec.read_cuts.is_empty() {
            cut(read_len, &spec.read_cuts, false, &mut bufs);
        }
        let n_read = bufs.len();
        if write_len > 0 || spec.write_cuts.is_empty() {
            cut(write_len, &spec.write_cuts, true, &mut bufs);
        }
        if swap {
            bufs.rotate_left(n_read);
        }

        let flags = |i: usize, writable: bool, count: usize| {
            let mut f = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < count {
                f |= VRING_DESC_F_NEXT as u16;
            }
            f
        };
        let head = if spec.indirect {
            let table = self.alloc.take(arena, bufs.len() as u64 * 16);
            for (i, &(a, l, w)) in bufs.iter().enumerate() {
                let d = desc_bytes(a, l, flags(i, w, bufs.len()), i as u16 + 1);
                self.write(table + i as u64 * 16, &d);
            }
            let head = self.next_desc % self.size;
            self.next_desc = self.next_desc.wrapping_add(1);
            let d = desc_bytes(
                table,
                bufs.len() as u32 * 16,
                VRING_DESC_F_INDIRECT as u16,
                0,
            );
            self.store_desc(head, d);
            head
        } else {
            let head = self.next_desc % self.size;
            for (i, &(a, l, w)) in bufs.iter().enumerate() {
                let idx = self.next_desc % self.size;
                let next = self.next_desc.wrapping_add(1) % self.size;
                self.store_desc(idx, desc_bytes(a, l, flags(i, w, bufs.len()), next));
                self.next_desc = self.next_desc.wrapping_add(1);
            }
            head
        };
        self.avail(head);
    }
}

/// Panics if a window of the neighbour's pages is in guest memory.
fn check_no_leak(w: &World, buf: &mut Vec<u8>) {
    for &(start, len) in &REGIONS {
        buf.resize(len, 0);
        w.mem
            .read_slice(&mut buf[..len], GuestAddress(start))
            .expect("region readable");
        for (i, c) in buf.chunks_exact(WINDOW).enumerate() {
            let v = u128::from_le_bytes(c.try_into().unwrap());
            if v != 0 && w.windows.contains(&v) {
                panic!(
                    "the neighbour's page data is in the fuzzed guest's memory at {:#x}",
                    start + (i * WINDOW) as u64
                );
            }
        }
    }
}

/// What the store really holds (page charges plus structure overhead)
/// stays within the host limit.
fn check_host_limit(store: &Store) {
    let (used, overhead, limit) = (store.host_used(), store.host_overhead(), store.host_limit());
    assert!(
        used + overhead <= limit,
        "host use {used} + overhead {overhead} above the limit {limit}"
    );
}

fn check_neighbour(n: &Neighbour, w: &World) {
    let mut page = [0u8; PAGE_SIZE];
    for i in 0..NEIGHBOUR_PERSISTENT {
        let hit = n
            .data
            .get(&handle(n.persistent, i % 2, i), &mut page)
            .expect("neighbour get");
        assert!(hit, "neighbour lost persistent page {i}");
        assert!(
            page == *w.secret_pages[i as usize],
            "neighbour's persistent page {i} changed"
        );
    }
    let first = (NEIGHBOUR_PERSISTENT + NEIGHBOUR_EPHEMERAL) as usize;
    for i in 0..NEIGHBOUR_SHARED {
        if n.data
            .get(&handle(n.shared, 0, i), &mut page)
            .expect("neighbour get")
        {
            assert!(
                page == *w.secret_pages[first + i as usize],
                "neighbour's shared page {i} changed"
            );
        }
    }
}

fn admin(a: &AdminHandle, op: &Admin) {
    match *op {
        Admin::Freeze => a.freeze(),
        Admin::Thaw => a.thaw(),
        Admin::Quota {
            persistent_kib,
            ephemeral_kib,
        } => a.set_quota(kib(persistent_kib), kib(ephemeral_kib)),
        Admin::FlushAll { ephemeral_only } => a.flush_all(ephemeral_only),
        Admin::Weight(w) => {
            let _ = a.set_weight(u32::from(w));
        }
    }
}

fn run(input: &Input) {
    static ZEROS: [u8; 0x1_0000] = [0; 0x1_0000];
    let w = world();
    for &(start, len) in &REGIONS {
        w.mem
            .write_slice(&ZEROS[..len], GuestAddress(start))
            .expect("zero");
    }

    let store = Store::new(StoreConfig {
        host_limit: u64::MAX,
    });
    let neighbour = neighbour(&store, w);
    store.set_host_limit(
        store.host_used() + store.host_overhead() + (u64::from(input.host_room_kib) << 10),
    );
    let fuzzed = store
        .add_client(
            "fuzzed",
            ClientConfig {
                persistent_quota: kib(input.persistent_quota_kib),
                ephemeral_quota: kib(input.ephemeral_quota_kib),
                dedup_group: Some("fuzz".into()),
                authorized_uuids: vec![uuid(MINE_A), uuid(MINE_B)],
                ..ClientConfig::default()
            },
        )
        .expect("client");

    let backend = VtmemBackend::new(
        fuzzed.data(),
        DeviceSettings {
            queues: 1,
            queue_size: MAX_QUEUE_SIZE,
            poll: std::time::Duration::ZERO,
            // The fuzzed guest memory is anonymous, with holes.
            allow_unsealed_memory: true,
        },
        Arc::new(DeviceCounters::default()),
        Arc::new(RateLimitedLog::new("fuzz")),
    );
    let bit = |b: u32| (input.features >> b) & 1 == 1;
    let event_idx = bit(4);
    let mut acked = 1u64 << VIRTIO_F_VERSION_1 | 1 << VTMEM_F_MQ;
    for (on, feature) in [
        (bit(0), VTMEM_F_EPHEMERAL),
        (bit(1), VTMEM_F_SHARED),
        (bit(2), VTMEM_F_RESERVE),
        (bit(3), VIRTIO_RING_F_INDIRECT_DESC),
        (event_idx, VIRTIO_RING_F_EVENT_IDX),
    ] {
        if on {
            acked |= 1 << feature;
        }
    }
    backend.acked_features(acked);
    backend.set_event_idx(event_idx);
    let atomic = GuestMemoryAtomic::new(w.mem.clone());
    backend.update_memory(atomic.clone()).expect("memory");
    let size = 1u16 << (input.queue_shift % 9);
    let vring = VringRwLock::new(atomic, MAX_QUEUE_SIZE).expect("vring");
    vring.set_queue_size(size);
    vring
        .set_queue_info(DESC_TABLE, AVAIL_RING, USED_RING)
        .expect("queue addresses");
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);

    let mut driver = Driver {
        mem: &w.mem,
        size,
        avail_idx: 0,
        next_desc: 0,
        alloc: Alloc::new(),
    };
    let mut scan = Vec::new();
    if input.init {
        let shared = |u| FuzzOp::NewPool {
            flags: 2,
            uuid: u,
            shift: None,
        };
        let ops = vec![
            FuzzOp::Reset,
            FuzzOp::NewPool {
                flags: 1,
                uuid: UuidSel::None,
                shift: None,
            },
            FuzzOp::NewPool {
                flags: 0,
                uuid: UuidSel::None,
                shift: None,
            },
            shared(UuidSel::MineA),
        ];
        driver.chain(&ChainSpec {
            ops,
            tag: 0,
            read_cuts: Vec::new(),
            write_cuts: Vec::new(),
            arena: 0,
            indirect: false,
            mangle: None,
        });
    }
    for step in input.steps.iter().take(64) {
        match step {
            Step::Chain(spec) => driver.chain(spec),
            Step::Desc { index, desc } => {
                driver.store_desc(index % size, driver.raw_desc(desc));
            }
            Step::Table { at, descs } => {
                let at = place(*at);
                for (i, d) in descs.iter().take(300).enumerate() {
                    driver.write(at.wrapping_add(i as u64 * 16), &driver.raw_desc(d));
                }
            }
            Step::Bytes { at, bytes } => driver.write(place(*at), bytes),
            Step::Avail(head) => driver.avail(*head),
            Step::AvailIdx(idx) => driver.set_avail_idx(*idx),
            Step::Kick => {
                backend
                    .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
                    .expect("handle_event");
                check_host_limit(&store);
                check_no_leak(w, &mut scan);
            }
            Step::Admin(op) => admin(&fuzzed, op),
        }
    }
    // A last kick, as the guest would after its last request.
    backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
        .expect("handle_event");
    check_host_limit(&store);
    check_no_leak(w, &mut scan);
    check_neighbour(&neighbour, w);
}

fuzz_target!(|input: Input| run(&input));
