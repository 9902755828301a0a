// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Public configuration, error and statistics types of the store.

use serde::{Deserialize, Serialize};
use vtmem_protocol::Uuid;

use super::account::OpCounters;

/// Store-wide configuration.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Host memory limit in bytes for everything the store accounts (data + metadata).
    pub host_limit: u64,
}

/// Per-client configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    /// Bytes of persistent data this client may hold (u64::MAX = unlimited).
    pub persistent_quota: u64,
    /// Bytes of ephemeral data this client may hold (u64::MAX = unlimited).
    pub ephemeral_quota: u64,
    /// Weight for sharing ephemeral capacity (>= 1).
    pub weight: u32,
    /// Dedup group: clients in the same named group share content across VMs.
    /// None = dedup only within this client.
    pub dedup_group: Option<String>,
    /// UUIDs of shared pools this client may create/join (serialised as
    /// `8-4-4-4-12` strings; byte arrays are accepted when reading).
    #[serde(default, with = "uuid_text::list")]
    pub authorized_uuids: Vec<Uuid>,
}

impl Default for ClientConfig {
    /// Unlimited quotas, weight 100, no dedup group, no UUID authorised.
    fn default() -> Self {
        ClientConfig {
            persistent_quota: u64::MAX,
            ephemeral_quota: u64::MAX,
            weight: 100,
            dedup_group: None,
            authorized_uuids: Vec::new(),
        }
    }
}

/// Errors of data-path and admin calls. The store's own: the device layer
/// decides how each reaches a guest.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TmemError {
    /// The host has no memory left for this put.
    #[error("host memory limit reached")]
    NoSpace,
    /// The client's quota for this kind of pool is used up.
    #[error("client quota exceeded")]
    OverQuota,
    /// The client is frozen: puts are refused.
    #[error("client is frozen")]
    Frozen,
    /// No such pool for this client.
    #[error("no such pool")]
    NoPool,
    /// The client already has `MAX_POOLS_PER_CLIENT` pools.
    #[error("too many pools")]
    TooManyPools,
    /// The client may not join the shared pool with that UUID.
    #[error("shared pool UUID not authorized for this client")]
    NotAuthorized,
    /// A reserved put found no reservation left.
    #[error("no reservation left")]
    NoReservation,
    /// An argument is invalid.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// The client was removed (its handle is stale).
    #[error("client was removed")]
    ClientGone,
    /// Admin: no client of that name.
    #[error("unknown client {0:?}")]
    UnknownClient(String),
    /// Admin: a client of that name exists.
    #[error("client {0:?} already exists")]
    ClientExists(String),
    /// Admin: a change that would need moving stored content (e.g. changing
    /// the dedup group of a client that holds pages). Also reported (as a
    /// device error) if stored content fails its integrity check.
    #[error("busy: {0}")]
    Busy(&'static str),
}

/// Statistics of one pool.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PoolStats {
    /// The pool's id for this client.
    pub id: u32,
    pub persistent: bool,
    /// UUID of a shared pool (serialised as an `8-4-4-4-12` string).
    #[serde(default, with = "uuid_text::option")]
    pub shared: Option<Uuid>,
    pub exclusive_gets: bool,
    /// Pages held.
    pub pages: u64,
    /// Bytes charged for them (to the pool's owner; in a shared pool, to
    /// the members that wrote them).
    pub bytes: u64,
    /// Pages reserved and not yet spent.
    pub reserved_pages: u64,
    /// Bytes of the pool's index beyond the per-page metadata cost (a
    /// sparse layout, one page per object), also charged to the owner.
    #[serde(default)]
    pub index_overhead: u64,
    /// Whether this client owns the pool (always true for private pools;
    /// a shared pool's owner is charged for its index).
    pub owned: bool,
    /// Pool-wide counters (for a shared pool: all members' operations).
    pub counters: OpCounters,
}

/// Statistics of one client.
///
/// Page and byte gauges cover the pages charged to this client: those of
/// its private pools and those it wrote in shared pools (see the module
/// documentation).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientStats {
    pub name: String,
    pub config: ClientConfig,
    pub frozen: bool,
    pub persistent_pages: u64,
    pub ephemeral_pages: u64,
    /// Charged bytes (see the charging rule); reservations not included.
    pub persistent_bytes: u64,
    pub ephemeral_bytes: u64,
    /// Zero pages currently held.
    pub zero_pages: u64,
    /// Same-filled (non-zero) pages currently held.
    pub same_filled_pages: u64,
    /// Pages currently held that were stored by a dedup hit.
    pub deduplicated_pages: u64,
    pub reserved_pages: u64,
    /// Bytes charged against the persistent quota: pages plus reservations.
    pub persistent_charged: u64,
    pub pools: Vec<PoolStats>,
    pub counters: OpCounters,
}

/// Statistics of the whole store.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoreStats {
    pub host_limit: u64,
    /// Bytes charged against the host limit: unique contents (slot bytes +
    /// content metadata cost) + per-page metadata cost + reservations.
    pub host_used: u64,
    /// Bytes the store's structures hold beyond those charges (allocator
    /// holes, sparse indexes, table slack), also held against the host
    /// limit: `host_used + host_overhead <= host_limit`.
    #[serde(default)]
    pub host_overhead: u64,
    /// Pages held, all pools (a shared pool counted once).
    pub stored_pages: u64,
    /// Distinct stored contents (data and same-filled patterns; zero pages
    /// need none).
    pub unique_pages: u64,
    /// Bytes of live allocator slots (compressed or raw data).
    pub data_bytes: u64,
    /// Bytes of metadata, measured from the real container capacities.
    pub metadata_bytes: u64,
    /// Uncompressed bytes of unique data contents / their slot bytes.
    pub compression_ratio: f64,
    /// Non-zero pages held / distinct contents.
    pub dedup_ratio: f64,
    pub counters: OpCounters,
    pub clients: Vec<ClientStats>,
    /// Zero pages held.
    pub zero_pages: u64,
    /// Same-filled pages held.
    pub same_filled_pages: u64,
    /// Unique contents stored raw (did not compress to 7/8 of a page).
    pub raw_pages: u64,
    /// Pages reserved and not yet spent.
    pub reserved_pages: u64,
    /// Bytes the slab allocators hold in chunks.
    pub allocator_footprint: u64,
    /// `1 - data_bytes / allocator_footprint` (0 when empty).
    pub fragmentation: f64,
    /// `metadata_bytes / stored_pages` (0 when empty).
    pub metadata_bytes_per_page: f64,
    /// Pools alive.
    pub pools: u64,
    /// Dedup domains alive.
    pub dedup_domains: u64,
}

/// Serde of UUIDs as their `8-4-4-4-12` text.
mod uuid_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use vtmem_protocol::Uuid;

    fn parse<E: serde::de::Error>(text: String) -> Result<Uuid, E> {
        text.parse()
            .map_err(|e| E::custom(format!("invalid UUID '{text}': {e}")))
    }

    pub mod list {
        use super::*;

        pub fn serialize<S: Serializer>(v: &[Uuid], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(Uuid::to_string))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Uuid>, D::Error> {
            Vec::<String>::deserialize(d)?
                .into_iter()
                .map(parse)
                .collect()
        }
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<Uuid>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(u) => s.serialize_some(&u.to_string()),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
            Option::<String>::deserialize(d)?.map(parse).transpose()
        }
    }
}
