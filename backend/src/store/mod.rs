// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The tmem store (skeleton: the API is final, bodies are being filled in).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
pub use vtmem_protocol::{Handle, ObjectId, PoolSpec, Status, Uuid, PAGE_SIZE};

/// One page of data.
pub type Page = [u8; PAGE_SIZE];

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
    /// UUIDs of shared pools this client may create/join.
    pub authorized_uuids: Vec<Uuid>,
}

impl Default for ClientConfig {
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

/// Errors of data-path and admin calls.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TmemError {
    /// The host has no memory left.
    #[error("host memory limit reached")]
    NoSpace,
    /// The client's quota is used up.
    #[error("client quota exceeded")]
    OverQuota,
    /// The client is frozen.
    #[error("client is frozen")]
    Frozen,
    /// No such pool.
    #[error("no such pool")]
    NoPool,
    /// Too many pools.
    #[error("too many pools")]
    TooManyPools,
    /// UUID not authorised.
    #[error("shared pool UUID not authorized for this client")]
    NotAuthorized,
    /// No reservation left.
    #[error("no reservation left")]
    NoReservation,
    /// Invalid argument.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// The client was removed (its handle is stale).
    #[error("client was removed")]
    ClientGone,
    /// Admin: no client of that name.
    #[error("unknown client {0}")]
    UnknownClient(String),
    /// Admin: a client of that name exists.
    #[error("client {0} already exists")]
    ClientExists(String),
    /// Admin: a change that would need moving stored content.
    #[error("busy: {0}")]
    Busy(&'static str),
}

impl TmemError {
    /// The wire status of a data-path error.
    pub fn status(&self) -> Status {
        match self {
            TmemError::NoSpace => Status::NoSpace,
            TmemError::OverQuota => Status::OverQuota,
            TmemError::Frozen => Status::Frozen,
            TmemError::NoPool => Status::NoPool,
            TmemError::TooManyPools => Status::TooManyPools,
            TmemError::NotAuthorized => Status::NotAuthorized,
            TmemError::NoReservation => Status::NoReservation,
            TmemError::Invalid(_) => Status::Invalid,
            TmemError::ClientGone
            | TmemError::UnknownClient(_)
            | TmemError::ClientExists(_)
            | TmemError::Busy(_) => Status::DeviceError,
        }
    }
}

/// Operation counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OpCounters {
    pub puts: u64,
    pub puts_stored: u64,
    pub puts_refused_no_space: u64,
    pub puts_refused_quota: u64,
    pub puts_refused_frozen: u64,
    pub puts_refused_other: u64,
    pub gets: u64,
    pub get_hits: u64,
    pub get_misses: u64,
    pub flush_pages: u64,
    pub flush_objects: u64,
    pub evictions: u64,
    pub dedup_hits: u64,
    pub zero_pages: u64,
    pub same_filled_pages: u64,
    /// Uncompressed bytes of stored puts.
    pub bytes_in: u64,
    /// Bytes actually written to the allocator for them.
    pub bytes_stored: u64,
}

/// Per-pool statistics.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PoolStats {
    pub id: u32,
    pub persistent: bool,
    pub shared: Option<Uuid>,
    pub exclusive_gets: bool,
    pub pages: u64,
    pub bytes: u64,
    pub reserved_pages: u64,
    pub counters: OpCounters,
}

/// Per-client statistics.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientStats {
    pub name: String,
    pub config: ClientConfig,
    pub frozen: bool,
    pub persistent_pages: u64,
    pub ephemeral_pages: u64,
    pub persistent_bytes: u64,
    pub ephemeral_bytes: u64,
    pub zero_pages: u64,
    pub same_filled_pages: u64,
    pub deduplicated_pages: u64,
    pub reserved_pages: u64,
    pub pools: Vec<PoolStats>,
    pub counters: OpCounters,
}

/// Store-wide statistics.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoreStats {
    pub host_limit: u64,
    pub host_used: u64,
    pub stored_pages: u64,
    pub unique_pages: u64,
    pub data_bytes: u64,
    pub metadata_bytes: u64,
    pub compression_ratio: f64,
    pub dedup_ratio: f64,
    pub counters: OpCounters,
    pub clients: Vec<ClientStats>,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    _config: StoreConfig,
}

impl Store {
    /// Creates a store.
    pub fn new(config: StoreConfig) -> Arc<Store> {
        Arc::new(Store { _config: config })
    }
    /// Adds a client.
    pub fn add_client(
        self: &Arc<Self>,
        _name: &str,
        _config: ClientConfig,
    ) -> Result<ClientHandle, TmemError> {
        todo!()
    }
    /// Looks a client up.
    pub fn client(&self, _name: &str) -> Option<ClientHandle> {
        todo!()
    }
    /// Frees everything the client holds.
    pub fn remove_client(&self, _name: &str) -> Result<(), TmemError> {
        todo!()
    }
    /// Client names.
    pub fn client_names(&self) -> Vec<String> {
        todo!()
    }
    /// Sets the host limit.
    pub fn set_host_limit(&self, _bytes: u64) {
        todo!()
    }
    /// The host limit.
    pub fn host_limit(&self) -> u64 {
        todo!()
    }
    /// Statistics.
    pub fn stats(&self) -> StoreStats {
        todo!()
    }
}

#[derive(Debug)]
struct ClientInner {
    name: String,
}

/// A client's handle.
#[derive(Clone, Debug)]
pub struct ClientHandle {
    inner: Arc<ClientInner>,
}

#[allow(unused_variables)]
impl ClientHandle {
    /// The client's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// Creates or joins a pool.
    pub fn new_pool(&self, spec: PoolSpec) -> Result<u32, TmemError> {
        todo!()
    }
    /// Destroys a pool.
    pub fn destroy_pool(&self, pool: u32) -> Result<(), TmemError> {
        todo!()
    }
    /// Stores a page.
    pub fn put(&self, handle: &Handle, page: &Page, reserved: bool) -> Result<(), TmemError> {
        todo!()
    }
    /// Loads a page.
    pub fn get(&self, handle: &Handle, out: &mut Page) -> Result<bool, TmemError> {
        todo!()
    }
    /// Drops a page.
    pub fn flush_page(&self, handle: &Handle) -> Result<(), TmemError> {
        todo!()
    }
    /// Drops an object.
    pub fn flush_object(&self, pool: u32, object: &ObjectId) -> Result<(), TmemError> {
        todo!()
    }
    /// Reserves pages.
    pub fn reserve(&self, pool: u32, pages: u64) -> Result<u64, TmemError> {
        todo!()
    }
    /// Unreserves pages.
    pub fn unreserve(&self, pool: u32, pages: u64) -> Result<u64, TmemError> {
        todo!()
    }
    /// Device reset.
    pub fn reset(&self) {
        todo!()
    }
    /// Sets quotas.
    pub fn set_quota(&self, persistent: u64, ephemeral: u64) {
        todo!()
    }
    /// Sets the weight.
    pub fn set_weight(&self, weight: u32) -> Result<(), TmemError> {
        todo!()
    }
    /// Freezes.
    pub fn freeze(&self) {
        todo!()
    }
    /// Thaws.
    pub fn thaw(&self) {
        todo!()
    }
    /// Drops pages, keeps pools.
    pub fn flush_all(&self, ephemeral_only: bool) {
        todo!()
    }
    /// Authorises a UUID.
    pub fn authorize(&self, uuid: Uuid) {
        todo!()
    }
    /// Deauthorises a UUID.
    pub fn deauthorize(&self, uuid: Uuid) {
        todo!()
    }
    /// Sets the dedup group.
    pub fn set_dedup_group(&self, group: Option<String>) -> Result<(), TmemError> {
        todo!()
    }
    /// The configuration.
    pub fn config(&self) -> ClientConfig {
        todo!()
    }
    /// Statistics.
    pub fn stats(&self) -> ClientStats {
        todo!()
    }
}
