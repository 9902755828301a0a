// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vtmem wire format: constants, layouts, encoders and validating decoders.
//!
//! This file is the one definition of the format. The host daemon uses it
//! through the `vtmem-protocol` crate; the guest kernel module compiles this
//! very file as a module (`#[path]`), which is why it has no inner attributes,
//! no dependencies, no allocation and nothing outside `core`.
//!
//! Every decoder takes arbitrary bytes and returns a typed error; none panics.
//! All integers are little-endian. `docs/protocol.md` is the prose
//! specification of what is encoded here.

use core::fmt;

/// Version carried in every request and response header and in the config.
pub const PROTOCOL_VERSION: u16 = 1;

/// Virtio device ID of the tmem device.
///
/// The virtio specification assigns IDs 1 to 45 (with gaps it keeps
/// reserved); 63 is the highest ID below 64, far from the allocated range,
/// so it cannot collide with a device a guest already drives.
pub const VIRTIO_ID_TMEM: u32 = 63;

/// Size of one page: the unit of every put and get.
pub const PAGE_SIZE: usize = 4096;
/// `log2(PAGE_SIZE)`: the only page shift a `NEW_POOL` may ask for.
pub const PAGE_SHIFT: u8 = 12;

/// Pools one client may have open at once (Xen's limit too).
pub const MAX_POOLS_PER_CLIENT: u32 = 16;
/// Operations one request may carry.
pub const MAX_OPS_PER_REQUEST: u16 = 128;
/// Request queues a device may offer.
pub const MAX_REQUEST_QUEUES: u16 = 64;

/// Feature bit: ephemeral (cleancache) pools are accepted.
pub const VTMEM_F_EPHEMERAL: u32 = 0;
/// Feature bit: shared ephemeral pools (joined by UUID) are accepted.
pub const VTMEM_F_SHARED: u32 = 1;
/// Feature bit: `num_request_queues` in the config is valid and may exceed 1.
pub const VTMEM_F_MQ: u32 = 2;
/// Feature bit: `RESERVE` / `UNRESERVE` and reserved puts are available.
pub const VTMEM_F_RESERVE: u32 = 3;

/// Size of [`RequestHeader`] on the wire.
pub const REQUEST_HEADER_SIZE: usize = 16;
/// Size of one operation descriptor on the wire.
pub const OP_DESC_SIZE: usize = 48;
/// Size of [`ResponseHeader`] on the wire.
pub const RESPONSE_HEADER_SIZE: usize = 16;
/// Size of one per-operation status on the wire.
pub const OP_STATUS_SIZE: usize = 16;
/// Size of [`DeviceConfig`] on the wire.
pub const CONFIG_SIZE: usize = 16;

/// Bytes of the request buffer for `num_ops` operations.
pub const fn request_len(num_ops: u16) -> usize {
    REQUEST_HEADER_SIZE + num_ops as usize * OP_DESC_SIZE
}

/// Bytes of the response buffer for `num_ops` operations.
pub const fn response_len(num_ops: u16) -> usize {
    RESPONSE_HEADER_SIZE + num_ops as usize * OP_STATUS_SIZE
}

/// Largest request buffer a valid request can have.
pub const MAX_REQUEST_LEN: usize = request_len(MAX_OPS_PER_REQUEST);
/// Largest response buffer a device ever writes.
pub const MAX_RESPONSE_LEN: usize = response_len(MAX_OPS_PER_REQUEST);

/// Why bytes could not be decoded or encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The buffer is shorter than the structure needs.
    Truncated { needed: usize, got: usize },
    /// The request buffer is longer than its header announces.
    TrailingBytes { expected: usize, got: usize },
    /// The header names a protocol version this side does not speak.
    BadVersion(u16),
    /// A request with no operations.
    NoOps,
    /// More operations than [`MAX_OPS_PER_REQUEST`].
    TooManyOps(u16),
    /// A field that must be zero is not.
    ReservedNotZero,
    /// An opcode this side does not know.
    UnknownOpcode(u8),
    /// Flag bits that are undefined for the operation.
    BadFlags(u8),
    /// `NEW_POOL` asked for a page size other than [`PAGE_SIZE`].
    BadPageShift(u64),
    /// A shared pool that is persistent, or a private pool with a UUID.
    BadPoolKind,
    /// A status code this side does not know.
    UnknownStatus(u16),
    /// A builder has no room for another operation.
    Full,
}

impl WireError {
    /// The status a device reports for an operation or request that failed
    /// to decode with this error.
    pub const fn status(self) -> Status {
        match self {
            WireError::BadVersion(_) => Status::BadVersion,
            WireError::UnknownOpcode(_) => Status::Unsupported,
            WireError::BadFlags(_)
            | WireError::BadPageShift(_)
            | WireError::BadPoolKind
            | WireError::ReservedNotZero => Status::Invalid,
            _ => Status::BadRequest,
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { needed, got } => {
                write!(f, "buffer too short: need {needed} bytes, got {got}")
            }
            WireError::TrailingBytes { expected, got } => {
                write!(
                    f,
                    "request buffer is {got} bytes, header implies {expected}"
                )
            }
            WireError::BadVersion(v) => write!(f, "unsupported protocol version {v}"),
            WireError::NoOps => write!(f, "request carries no operations"),
            WireError::TooManyOps(n) => {
                write!(
                    f,
                    "{n} operations exceed the limit of {MAX_OPS_PER_REQUEST}"
                )
            }
            WireError::ReservedNotZero => write!(f, "reserved field is not zero"),
            WireError::UnknownOpcode(op) => write!(f, "unknown opcode {op}"),
            WireError::BadFlags(fl) => write!(f, "undefined flag bits {fl:#04x}"),
            WireError::BadPageShift(s) => write!(f, "unsupported page shift {s}"),
            WireError::BadPoolKind => write!(f, "shared pools must be ephemeral and carry a UUID"),
            WireError::UnknownStatus(s) => write!(f, "unknown status code {s}"),
            WireError::Full => write!(f, "no room for another operation"),
        }
    }
}

/// Result of every decoder in this module.
pub type WireResult<T> = core::result::Result<T, WireError>;

fn read_u16(buf: &[u8], at: usize) -> u16 {
    let mut b = [0u8; 2];
    if let Some(src) = buf.get(at..at + 2) {
        b.copy_from_slice(src);
    }
    u16::from_le_bytes(b)
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(src) = buf.get(at..at + 4) {
        b.copy_from_slice(src);
    }
    u32::from_le_bytes(b)
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = buf.get(at..at + 8) {
        b.copy_from_slice(src);
    }
    u64::from_le_bytes(b)
}

fn write_bytes(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

fn need(buf: &[u8], needed: usize) -> WireResult<()> {
    if buf.len() < needed {
        Err(WireError::Truncated {
            needed,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}

/// Operation codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Create a pool (or join a shared one); the status value is the pool id.
    NewPool = 1,
    /// Destroy a pool and every page in it.
    DestroyPool = 2,
    /// Store one page; consumes one device-readable page buffer.
    Put = 3,
    /// Load one page; consumes one device-writable page buffer.
    Get = 4,
    /// Drop one page.
    FlushPage = 5,
    /// Drop every page of one object.
    FlushObject = 6,
    /// Reserve room for persistent puts; the status value is pages granted.
    Reserve = 7,
    /// Give back reserved room; the status value is pages still reserved.
    Unreserve = 8,
    /// The driver (re)initialised the device: drop every pool of the client.
    ///
    /// vhost-user gives the device no reliable reset signal (pausing a VM
    /// stops the rings too), so the driver states it: once, at probe, before
    /// any other operation. A reconnect after a backend restart sends none,
    /// and the client's pools survive it.
    Reset = 9,
}

impl Opcode {
    /// Decodes an opcode byte.
    pub const fn from_u8(v: u8) -> WireResult<Self> {
        Ok(match v {
            1 => Opcode::NewPool,
            2 => Opcode::DestroyPool,
            3 => Opcode::Put,
            4 => Opcode::Get,
            5 => Opcode::FlushPage,
            6 => Opcode::FlushObject,
            7 => Opcode::Reserve,
            8 => Opcode::Unreserve,
            9 => Opcode::Reset,
            other => return Err(WireError::UnknownOpcode(other)),
        })
    }
}

/// Which page buffer, if any, an operation consumes from the chain.
///
/// Decided by the opcode byte alone, so that guest and device agree on the
/// chain layout even for operations whose other fields are invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageBuffer {
    /// No page buffer.
    None,
    /// One device-readable page (PUT).
    ToDevice,
    /// One device-writable page (GET).
    FromDevice,
}

impl PageBuffer {
    /// The buffer consumed by an operation with this raw opcode byte.
    pub const fn for_opcode_byte(op: u8) -> Self {
        match op {
            3 => PageBuffer::ToDevice,
            4 => PageBuffer::FromDevice,
            _ => PageBuffer::None,
        }
    }
}

/// Status codes, per operation and per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// GET found no page (always possible for ephemeral pools).
    Miss = 1,
    /// The host has no memory left for this put.
    NoSpace = 2,
    /// The client's quota for this kind of pool is used up.
    OverQuota = 3,
    /// The client is frozen by the admin: puts are refused.
    Frozen = 4,
    /// No such pool for this client.
    NoPool = 5,
    /// An argument is invalid (flags, page shift, reserved fields...).
    Invalid = 6,
    /// Unknown opcode, or an operation whose feature was not negotiated.
    Unsupported = 7,
    /// The client already has [`MAX_POOLS_PER_CLIENT`] pools.
    TooManyPools = 8,
    /// The client may not join the shared pool with that UUID.
    NotAuthorized = 9,
    /// A reserved put found no reservation left.
    NoReservation = 10,
    /// Request level: the header's version is not spoken by the device.
    BadVersion = 11,
    /// Request level: the request buffer is malformed.
    BadRequest = 12,
    /// Request level: page buffers do not match the operations.
    BadChain = 13,
    /// The device failed internally; nothing was changed.
    DeviceError = 14,
}

impl Status {
    /// Decodes a status code.
    pub const fn from_u16(v: u16) -> WireResult<Self> {
        Ok(match v {
            0 => Status::Ok,
            1 => Status::Miss,
            2 => Status::NoSpace,
            3 => Status::OverQuota,
            4 => Status::Frozen,
            5 => Status::NoPool,
            6 => Status::Invalid,
            7 => Status::Unsupported,
            8 => Status::TooManyPools,
            9 => Status::NotAuthorized,
            10 => Status::NoReservation,
            11 => Status::BadVersion,
            12 => Status::BadRequest,
            13 => Status::BadChain,
            14 => Status::DeviceError,
            other => return Err(WireError::UnknownStatus(other)),
        })
    }

    /// A short lowercase name, for logs and statistics.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Miss => "miss",
            Status::NoSpace => "no_space",
            Status::OverQuota => "over_quota",
            Status::Frozen => "frozen",
            Status::NoPool => "no_pool",
            Status::Invalid => "invalid",
            Status::Unsupported => "unsupported",
            Status::TooManyPools => "too_many_pools",
            Status::NotAuthorized => "not_authorized",
            Status::NoReservation => "no_reservation",
            Status::BadVersion => "bad_version",
            Status::BadRequest => "bad_request",
            Status::BadChain => "bad_chain",
            Status::DeviceError => "device_error",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// 192-bit object id (an inode number or file handle, or a swap type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub [u64; 3]);

/// Names one page: pool, object, index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle {
    /// Pool id returned by `NEW_POOL`.
    pub pool: u32,
    /// Object within the pool.
    pub object: ObjectId,
    /// Page index within the object.
    pub index: u64,
}

/// The 128-bit UUID naming a shared pool, in RFC 4122 (text) byte order.
///
/// Never nil: on the wire an all-zero UUID means "private pool", so a nil
/// UUID cannot name a shared one. [`Uuid::from_bytes`] and the text parser
/// refuse it, which makes the rule a property of the type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid([u8; 16]);

/// Why a text is not a [`Uuid`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UuidError {
    /// Not 32 hexadecimal digits (dashes aside).
    Malformed,
    /// The nil UUID, which names no shared pool.
    Nil,
}

impl fmt::Display for UuidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UuidError::Malformed => f.write_str("not a UUID (32 hex digits, 8-4-4-4-12)"),
            UuidError::Nil => f.write_str("the nil UUID names no shared pool"),
        }
    }
}

impl Uuid {
    /// The UUID with these bytes, or `None` for the nil UUID.
    pub const fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        let mut i = 0;
        while i < 16 {
            if bytes[i] != 0 {
                return Some(Uuid(bytes));
            }
            i += 1;
        }
        None
    }

    /// Its 16 bytes in RFC 4122 order.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The two little-endian words that carry it in a `NEW_POOL` object id.
    const fn to_words(self) -> [u64; 2] {
        let b = self.0;
        [
            u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        ]
    }

    /// The UUID carried by a `NEW_POOL` object id, `None` if both words are 0.
    const fn from_words(lo: u64, hi: u64) -> Option<Self> {
        let (l, h) = (lo.to_le_bytes(), hi.to_le_bytes());
        Uuid::from_bytes([
            l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], h[0], h[1], h[2], h[3], h[4], h[5],
            h[6], h[7],
        ])
    }
}

impl fmt::Display for Uuid {
    /// The usual `8-4-4-4-12` lower-case form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl core::str::FromStr for Uuid {
    type Err = UuidError;

    /// Parses 32 hex digits in either case; dashes anywhere are ignored
    /// (so `8-4-4-4-12` and the bare form both parse), as is surrounding
    /// white space.
    fn from_str(s: &str) -> Result<Self, UuidError> {
        let mut out = [0u8; 16];
        let mut digits = 0usize;
        for c in s.trim().bytes().filter(|&c| c != b'-') {
            let v = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return Err(UuidError::Malformed),
            };
            let Some(byte) = out.get_mut(digits / 2) else {
                return Err(UuidError::Malformed);
            };
            *byte = (*byte << 4) | v;
            digits += 1;
        }
        if digits != 32 {
            return Err(UuidError::Malformed);
        }
        Uuid::from_bytes(out).ok_or(UuidError::Nil)
    }
}

/// `NEW_POOL` flag: pages must survive until flushed (frontswap).
pub const POOL_PERSISTENT: u8 = 1 << 0;
/// `NEW_POOL` flag: join or create the shared pool named by the UUID.
pub const POOL_SHARED: u8 = 1 << 1;
/// `NEW_POOL` flag: persistent gets remove the page (frontswap's option).
pub const POOL_EXCLUSIVE_GETS: u8 = 1 << 2;
const POOL_FLAGS_ALL: u8 = POOL_PERSISTENT | POOL_SHARED | POOL_EXCLUSIVE_GETS;

/// `PUT` flag: the put spends one page of the pool's reservation and so
/// cannot be refused for space or quota.
pub const PUT_RESERVED: u8 = 1 << 0;
const PUT_FLAGS_ALL: u8 = PUT_RESERVED;

/// Kind of pool requested by `NEW_POOL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolSpec {
    /// Persistent (frontswap) rather than ephemeral (cleancache).
    pub persistent: bool,
    /// Gets remove the page. Always true for private ephemeral pools.
    pub exclusive_gets: bool,
    /// UUID of a shared ephemeral pool; `None` for a private pool.
    pub shared: Option<Uuid>,
}

impl PoolSpec {
    /// A private persistent pool (frontswap).
    pub const fn persistent() -> Self {
        PoolSpec {
            persistent: true,
            exclusive_gets: false,
            shared: None,
        }
    }

    /// A private ephemeral pool (cleancache): gets are exclusive.
    pub const fn ephemeral() -> Self {
        PoolSpec {
            persistent: false,
            exclusive_gets: true,
            shared: None,
        }
    }

    /// A shared ephemeral pool: gets keep the page.
    pub const fn shared(uuid: Uuid) -> Self {
        PoolSpec {
            persistent: false,
            exclusive_gets: false,
            shared: Some(uuid),
        }
    }

    /// The `NEW_POOL` flag bits of this spec (the device state's pool
    /// flags are the same bits).
    pub const fn flags(&self) -> u8 {
        let mut f = 0;
        if self.persistent {
            f |= POOL_PERSISTENT;
        }
        if self.shared.is_some() {
            f |= POOL_SHARED;
        }
        if self.exclusive_gets {
            f |= POOL_EXCLUSIVE_GETS;
        }
        f
    }
}

/// One decoded operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create a pool.
    NewPool(PoolSpec),
    /// Destroy a pool.
    DestroyPool { pool: u32 },
    /// Store the next device-readable page buffer under `handle`.
    Put { handle: Handle, reserved: bool },
    /// Load `handle` into the next device-writable page buffer.
    Get { handle: Handle },
    /// Drop one page.
    FlushPage { handle: Handle },
    /// Drop every page of an object.
    FlushObject { pool: u32, object: ObjectId },
    /// Reserve room for `pages` persistent puts.
    Reserve { pool: u32, pages: u64 },
    /// Give back `pages` of reserved room.
    Unreserve { pool: u32, pages: u64 },
    /// Drop every pool of the client (driver initialisation).
    Reset,
}

impl Op {
    /// The operation's opcode.
    pub const fn opcode(&self) -> Opcode {
        match self {
            Op::NewPool(_) => Opcode::NewPool,
            Op::DestroyPool { .. } => Opcode::DestroyPool,
            Op::Put { .. } => Opcode::Put,
            Op::Get { .. } => Opcode::Get,
            Op::FlushPage { .. } => Opcode::FlushPage,
            Op::FlushObject { .. } => Opcode::FlushObject,
            Op::Reserve { .. } => Opcode::Reserve,
            Op::Unreserve { .. } => Opcode::Unreserve,
            Op::Reset => Opcode::Reset,
        }
    }

    /// The page buffer this operation consumes.
    pub const fn page_buffer(&self) -> PageBuffer {
        PageBuffer::for_opcode_byte(self.opcode() as u8)
    }

    /// Encodes the operation into its 48-byte descriptor.
    ///
    /// Layout: `opcode u8, flags u8, reserved u16, pool u32, object [u64; 3],
    /// index u64, arg u64`.
    pub fn encode(&self) -> [u8; OP_DESC_SIZE] {
        let (flags, pool, object, index, arg) = match *self {
            Op::NewPool(spec) => {
                let mut obj = [0u64; 3];
                if let Some(uuid) = spec.shared {
                    [obj[0], obj[1]] = uuid.to_words();
                }
                (spec.flags(), 0, ObjectId(obj), 0, PAGE_SHIFT as u64)
            }
            Op::DestroyPool { pool } => (0, pool, ObjectId::default(), 0, 0),
            Op::Put { handle, reserved } => (
                if reserved { PUT_RESERVED } else { 0 },
                handle.pool,
                handle.object,
                handle.index,
                0,
            ),
            Op::Get { handle } | Op::FlushPage { handle } => {
                (0, handle.pool, handle.object, handle.index, 0)
            }
            Op::FlushObject { pool, object } => (0, pool, object, 0, 0),
            Op::Reserve { pool, pages } | Op::Unreserve { pool, pages } => {
                (0, pool, ObjectId::default(), 0, pages)
            }
            Op::Reset => (0, 0, ObjectId::default(), 0, 0),
        };
        let mut b = [0u8; OP_DESC_SIZE];
        b[0] = self.opcode() as u8;
        b[1] = flags;
        write_bytes(&mut b, 4, &pool.to_le_bytes());
        for (i, word) in object.0.iter().enumerate() {
            write_bytes(&mut b, 8 + 8 * i, &word.to_le_bytes());
        }
        write_bytes(&mut b, 32, &index.to_le_bytes());
        write_bytes(&mut b, 40, &arg.to_le_bytes());
        b
    }

    /// Decodes and validates one 48-byte operation descriptor.
    pub fn decode(b: &[u8]) -> WireResult<Self> {
        need(b, OP_DESC_SIZE)?;
        let opcode = Opcode::from_u8(b[0])?;
        let flags = b[1];
        if read_u16(b, 2) != 0 {
            return Err(WireError::ReservedNotZero);
        }
        let pool = read_u32(b, 4);
        let object = ObjectId([read_u64(b, 8), read_u64(b, 16), read_u64(b, 24)]);
        let index = read_u64(b, 32);
        let arg = read_u64(b, 40);
        let handle = Handle {
            pool,
            object,
            index,
        };
        let no_flags = |op: Op| {
            if flags != 0 {
                Err(WireError::BadFlags(flags))
            } else {
                Ok(op)
            }
        };
        match opcode {
            Opcode::NewPool => {
                if flags & !POOL_FLAGS_ALL != 0 {
                    return Err(WireError::BadFlags(flags));
                }
                if arg != PAGE_SHIFT as u64 {
                    return Err(WireError::BadPageShift(arg));
                }
                if pool != 0 || index != 0 || object.0[2] != 0 {
                    return Err(WireError::ReservedNotZero);
                }
                let persistent = flags & POOL_PERSISTENT != 0;
                let shared = flags & POOL_SHARED != 0;
                if shared && persistent {
                    return Err(WireError::BadPoolKind);
                }
                let uuid = Uuid::from_words(object.0[0], object.0[1]);
                if uuid.is_some() != shared {
                    return Err(WireError::BadPoolKind);
                }
                let shared = uuid;
                // A private ephemeral pool is exclusive by definition: the
                // data must live in one place, guest or host.
                let exclusive_gets =
                    flags & POOL_EXCLUSIVE_GETS != 0 || (!persistent && shared.is_none());
                Ok(Op::NewPool(PoolSpec {
                    persistent,
                    exclusive_gets,
                    shared,
                }))
            }
            Opcode::DestroyPool => {
                if object != ObjectId::default() || index != 0 || arg != 0 {
                    return Err(WireError::ReservedNotZero);
                }
                no_flags(Op::DestroyPool { pool })
            }
            Opcode::Put => {
                if flags & !PUT_FLAGS_ALL != 0 {
                    return Err(WireError::BadFlags(flags));
                }
                if arg != 0 {
                    return Err(WireError::ReservedNotZero);
                }
                Ok(Op::Put {
                    handle,
                    reserved: flags & PUT_RESERVED != 0,
                })
            }
            Opcode::Get | Opcode::FlushPage => {
                if arg != 0 {
                    return Err(WireError::ReservedNotZero);
                }
                if opcode == Opcode::Get {
                    no_flags(Op::Get { handle })
                } else {
                    no_flags(Op::FlushPage { handle })
                }
            }
            Opcode::FlushObject => {
                if index != 0 || arg != 0 {
                    return Err(WireError::ReservedNotZero);
                }
                no_flags(Op::FlushObject { pool, object })
            }
            Opcode::Reserve | Opcode::Unreserve => {
                if object != ObjectId::default() || index != 0 {
                    return Err(WireError::ReservedNotZero);
                }
                if opcode == Opcode::Reserve {
                    no_flags(Op::Reserve { pool, pages: arg })
                } else {
                    no_flags(Op::Unreserve { pool, pages: arg })
                }
            }
            Opcode::Reset => {
                if pool != 0 || object != ObjectId::default() || index != 0 || arg != 0 {
                    return Err(WireError::ReservedNotZero);
                }
                no_flags(Op::Reset)
            }
        }
    }
}

/// Header of the device-readable request buffer.
///
/// Layout: `version u16, num_ops u16, flags u32 (zero), tag u64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Number of operation descriptors that follow.
    pub num_ops: u16,
    /// Opaque to the device; echoed in the response.
    pub tag: u64,
}

impl RequestHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_SIZE] {
        let mut b = [0u8; REQUEST_HEADER_SIZE];
        write_bytes(&mut b, 0, &PROTOCOL_VERSION.to_le_bytes());
        write_bytes(&mut b, 2, &self.num_ops.to_le_bytes());
        write_bytes(&mut b, 8, &self.tag.to_le_bytes());
        b
    }

    /// Decodes and validates a header (not the operations after it).
    pub fn decode(b: &[u8]) -> WireResult<Self> {
        need(b, REQUEST_HEADER_SIZE)?;
        let version = read_u16(b, 0);
        if version != PROTOCOL_VERSION {
            return Err(WireError::BadVersion(version));
        }
        let num_ops = read_u16(b, 2);
        if read_u32(b, 4) != 0 {
            return Err(WireError::ReservedNotZero);
        }
        if num_ops == 0 {
            return Err(WireError::NoOps);
        }
        if num_ops > MAX_OPS_PER_REQUEST {
            return Err(WireError::TooManyOps(num_ops));
        }
        Ok(RequestHeader {
            num_ops,
            tag: read_u64(b, 8),
        })
    }
}

/// A validated request buffer: header plus raw operation descriptors.
///
/// Operations are decoded one by one with [`Request::op`], so that one bad
/// operation yields a status for that operation alone.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    header: RequestHeader,
    ops: &'a [u8],
}

impl<'a> Request<'a> {
    /// Checks the header and that the buffer holds exactly its operations.
    pub fn parse(buf: &'a [u8]) -> WireResult<Self> {
        let header = RequestHeader::decode(buf)?;
        let expected = request_len(header.num_ops);
        need(buf, expected)?;
        if buf.len() != expected {
            return Err(WireError::TrailingBytes {
                expected,
                got: buf.len(),
            });
        }
        Ok(Request {
            header,
            ops: buf.get(REQUEST_HEADER_SIZE..).unwrap_or(&[]),
        })
    }

    /// The header.
    pub fn header(&self) -> RequestHeader {
        self.header
    }

    /// Number of operations.
    pub fn num_ops(&self) -> u16 {
        self.header.num_ops
    }

    /// Raw opcode byte of operation `i` (0 when out of range).
    pub fn opcode_byte(&self, i: u16) -> u8 {
        self.ops
            .get(i as usize * OP_DESC_SIZE)
            .copied()
            .unwrap_or(0)
    }

    /// Decodes operation `i`.
    pub fn op(&self, i: u16) -> WireResult<Op> {
        let start = i as usize * OP_DESC_SIZE;
        let bytes = self
            .ops
            .get(start..start + OP_DESC_SIZE)
            .ok_or(WireError::Truncated {
                needed: start + OP_DESC_SIZE,
                got: self.ops.len(),
            })?;
        Op::decode(bytes)
    }

    /// How many page buffers each direction must carry for this request.
    pub fn page_buffers(&self) -> PageBufferCounts {
        let mut counts = PageBufferCounts::default();
        for i in 0..self.num_ops() {
            counts.add(PageBuffer::for_opcode_byte(self.opcode_byte(i)));
        }
        counts
    }
}

/// Number of page buffers a request needs in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageBufferCounts {
    /// Device-readable pages (one per PUT).
    pub to_device: u16,
    /// Device-writable pages (one per GET).
    pub from_device: u16,
}

impl PageBufferCounts {
    /// Counts one more operation's buffer.
    pub fn add(&mut self, buffer: PageBuffer) {
        match buffer {
            PageBuffer::None => {}
            PageBuffer::ToDevice => self.to_device += 1,
            PageBuffer::FromDevice => self.from_device += 1,
        }
    }
}

/// Builds a request buffer in caller-provided memory (no allocation).
#[derive(Debug)]
pub struct RequestBuilder<'a> {
    buf: &'a mut [u8],
    num_ops: u16,
    counts: PageBufferCounts,
}

impl<'a> RequestBuilder<'a> {
    /// Starts a request in `buf`, which must hold at least the header.
    pub fn new(buf: &'a mut [u8]) -> WireResult<Self> {
        need(buf, REQUEST_HEADER_SIZE)?;
        Ok(RequestBuilder {
            buf,
            num_ops: 0,
            counts: PageBufferCounts::default(),
        })
    }

    /// Appends one operation.
    pub fn push(&mut self, op: &Op) -> WireResult<()> {
        if self.num_ops >= MAX_OPS_PER_REQUEST {
            return Err(WireError::Full);
        }
        let start = request_len(self.num_ops);
        let dst = self
            .buf
            .get_mut(start..start + OP_DESC_SIZE)
            .ok_or(WireError::Full)?;
        dst.copy_from_slice(&op.encode());
        self.num_ops += 1;
        self.counts.add(op.page_buffer());
        Ok(())
    }

    /// Operations pushed so far.
    pub fn num_ops(&self) -> u16 {
        self.num_ops
    }

    /// Page buffers the chain must carry for the operations pushed so far.
    pub fn page_buffers(&self) -> PageBufferCounts {
        self.counts
    }

    /// Writes the header; returns the request's length in bytes.
    pub fn finish(self, tag: u64) -> WireResult<usize> {
        if self.num_ops == 0 {
            return Err(WireError::NoOps);
        }
        let header = RequestHeader {
            num_ops: self.num_ops,
            tag,
        };
        write_bytes(self.buf, 0, &header.encode());
        Ok(request_len(self.num_ops))
    }
}

/// Header of the device-writable response buffer.
///
/// Layout: `version u16, num_ops u16, status u16, reserved u16, tag u64`.
/// `num_ops` is the number of status entries that follow: the request's
/// operation count when `status` is OK, zero otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Status entries that follow.
    pub num_ops: u16,
    /// Request-level status.
    pub status: Status,
    /// The request's tag (0 if the request header could not be read).
    pub tag: u64,
}

impl ResponseHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_SIZE] {
        let mut b = [0u8; RESPONSE_HEADER_SIZE];
        write_bytes(&mut b, 0, &PROTOCOL_VERSION.to_le_bytes());
        write_bytes(&mut b, 2, &self.num_ops.to_le_bytes());
        write_bytes(&mut b, 4, &(self.status as u16).to_le_bytes());
        write_bytes(&mut b, 8, &self.tag.to_le_bytes());
        b
    }

    /// Decodes a response header.
    pub fn decode(b: &[u8]) -> WireResult<Self> {
        need(b, RESPONSE_HEADER_SIZE)?;
        let version = read_u16(b, 0);
        if version != PROTOCOL_VERSION {
            return Err(WireError::BadVersion(version));
        }
        if read_u16(b, 6) != 0 {
            return Err(WireError::ReservedNotZero);
        }
        let num_ops = read_u16(b, 2);
        if num_ops > MAX_OPS_PER_REQUEST {
            return Err(WireError::TooManyOps(num_ops));
        }
        Ok(ResponseHeader {
            num_ops,
            status: Status::from_u16(read_u16(b, 4))?,
            tag: read_u64(b, 8),
        })
    }
}

/// Outcome of one operation.
///
/// Layout: `status u16, reserved u16, reserved u32, value u64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpStatus {
    /// What happened.
    pub status: Status,
    /// `NEW_POOL`: the pool id. `RESERVE`: pages granted. `UNRESERVE`:
    /// pages still reserved. Otherwise zero.
    pub value: u64,
}

impl OpStatus {
    /// A status with no value.
    pub const fn new(status: Status) -> Self {
        OpStatus { status, value: 0 }
    }

    /// Encodes the status entry.
    pub fn encode(&self) -> [u8; OP_STATUS_SIZE] {
        let mut b = [0u8; OP_STATUS_SIZE];
        write_bytes(&mut b, 0, &(self.status as u16).to_le_bytes());
        write_bytes(&mut b, 8, &self.value.to_le_bytes());
        b
    }

    /// Decodes a status entry.
    pub fn decode(b: &[u8]) -> WireResult<Self> {
        need(b, OP_STATUS_SIZE)?;
        if read_u16(b, 2) != 0 || read_u32(b, 4) != 0 {
            return Err(WireError::ReservedNotZero);
        }
        Ok(OpStatus {
            status: Status::from_u16(read_u16(b, 0))?,
            value: read_u64(b, 8),
        })
    }
}

/// A decoded response buffer.
#[derive(Clone, Copy, Debug)]
pub struct Response<'a> {
    header: ResponseHeader,
    statuses: &'a [u8],
}

impl<'a> Response<'a> {
    /// Checks the header and that all its status entries are present.
    pub fn parse(buf: &'a [u8]) -> WireResult<Self> {
        let header = ResponseHeader::decode(buf)?;
        need(buf, response_len(header.num_ops))?;
        Ok(Response {
            header,
            statuses: buf.get(RESPONSE_HEADER_SIZE..).unwrap_or(&[]),
        })
    }

    /// The header.
    pub fn header(&self) -> ResponseHeader {
        self.header
    }

    /// Status of operation `i`.
    pub fn status(&self, i: u16) -> WireResult<OpStatus> {
        if i >= self.header.num_ops {
            return Err(WireError::Truncated {
                needed: response_len(i.saturating_add(1)),
                got: RESPONSE_HEADER_SIZE + self.statuses.len(),
            });
        }
        let start = i as usize * OP_STATUS_SIZE;
        OpStatus::decode(self.statuses.get(start..).unwrap_or(&[]))
    }
}

/// Writes a response into a device-writable buffer.
#[derive(Debug)]
pub struct ResponseWriter<'a> {
    buf: &'a mut [u8],
}

impl<'a> ResponseWriter<'a> {
    /// Starts a response in `buf`, which must hold the whole response for
    /// `num_ops` operations.
    pub fn new(buf: &'a mut [u8], num_ops: u16) -> WireResult<Self> {
        need(buf, response_len(num_ops))?;
        Ok(ResponseWriter { buf })
    }

    /// Records the outcome of operation `i`.
    pub fn set(&mut self, i: u16, status: OpStatus) {
        let start = RESPONSE_HEADER_SIZE + i as usize * OP_STATUS_SIZE;
        write_bytes(self.buf, start, &status.encode());
    }

    /// Writes the header; returns the number of bytes the response uses.
    pub fn finish(self, header: ResponseHeader) -> usize {
        write_bytes(self.buf, 0, &header.encode());
        response_len(header.num_ops)
    }
}

/// The device configuration space.
///
/// Layout: `num_request_queues u16, max_ops_per_request u16, max_pools u16,
/// page_shift u8, reserved u8, version u16, reserved u16, generation u32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Request queues offered (valid with `VTMEM_F_MQ`; 1 otherwise).
    pub num_request_queues: u16,
    /// Largest `num_ops` the device accepts in one request.
    pub max_ops_per_request: u16,
    /// Pools one client may hold.
    pub max_pools: u16,
    /// `log2` of the page size: always [`PAGE_SHIFT`].
    pub page_shift: u8,
    /// Protocol version the device speaks.
    pub version: u16,
    /// Names the back end connection that serves the device: it changes
    /// when a new back end takes the device over (a restart, an upgrade,
    /// the end of a migration), and the device then signals a
    /// configuration change. 0: the device does not say.
    pub generation: u32,
}

impl DeviceConfig {
    /// The configuration of a device with `num_request_queues` queues.
    pub const fn new(num_request_queues: u16) -> Self {
        DeviceConfig {
            num_request_queues,
            max_ops_per_request: MAX_OPS_PER_REQUEST,
            max_pools: MAX_POOLS_PER_CLIENT as u16,
            page_shift: PAGE_SHIFT,
            version: PROTOCOL_VERSION,
            generation: 0,
        }
    }

    /// The same configuration, naming back end connection `generation`.
    pub const fn with_generation(self, generation: u32) -> Self {
        DeviceConfig { generation, ..self }
    }

    /// Encodes the configuration space.
    pub fn encode(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        write_bytes(&mut b, 0, &self.num_request_queues.to_le_bytes());
        write_bytes(&mut b, 2, &self.max_ops_per_request.to_le_bytes());
        write_bytes(&mut b, 4, &self.max_pools.to_le_bytes());
        b[6] = self.page_shift;
        write_bytes(&mut b, 8, &self.version.to_le_bytes());
        write_bytes(&mut b, 12, &self.generation.to_le_bytes());
        b
    }

    /// Decodes and sanity-checks a configuration space.
    pub fn decode(b: &[u8]) -> WireResult<Self> {
        need(b, CONFIG_SIZE)?;
        let cfg = DeviceConfig {
            num_request_queues: read_u16(b, 0),
            max_ops_per_request: read_u16(b, 2),
            max_pools: read_u16(b, 4),
            page_shift: b[6],
            version: read_u16(b, 8),
            generation: read_u32(b, 12),
        };
        if cfg.version != PROTOCOL_VERSION {
            return Err(WireError::BadVersion(cfg.version));
        }
        if cfg.page_shift != PAGE_SHIFT {
            return Err(WireError::BadPageShift(cfg.page_shift as u64));
        }
        if cfg.max_ops_per_request == 0 || cfg.num_request_queues == 0 {
            return Err(WireError::NoOps);
        }
        if cfg.max_ops_per_request > MAX_OPS_PER_REQUEST {
            return Err(WireError::TooManyOps(cfg.max_ops_per_request));
        }
        Ok(cfg)
    }
}
