// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A migration source's device state, as a broken or hostile VMM (or a
//! corrupted migration stream) can hand it to vtmemd: the import
//! (`DataHandle::import_image`, what `SET_DEVICE_STATE_FD` runs) on
//! arbitrary streams.
//!
//! The input is read two ways: once as the raw stream, and once as a list
//! of frames that this target seals with valid checksums (so that the
//! fuzzer reaches the pool, page and end-frame checks past the framing).
//! After each import:
//!
//! - nothing panicked (a panic aborts the process);
//! - a refused import left the client holding nothing, and the store
//!   charged nothing for it;
//! - an accepted import exports again to a stream that imports into a
//!   second client with the same summary and the same pages;
//! - the store stays within its host limit, and its overhead counter
//!   equals a fresh recount.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vtmem_protocol::Uuid;
use vtmem_store::{AdminHandle, ClientConfig, Store, StoreConfig, IMAGE_MAGIC, IMAGE_VERSION};
use xxhash_rust::xxh3::Xxh3;

#[derive(Arbitrary, Debug)]
struct Frame {
    kind: u8,
    payload: Vec<u8>,
    /// Break the checksum of this frame.
    bad_sum: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    raw: Vec<u8>,
    frames: Vec<Frame>,
    /// Host room in KiB beyond a base (small limits make imports fail
    /// part way through).
    room_kib: u16,
}

fn sealed(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&IMAGE_MAGIC);
    out.extend_from_slice(&IMAGE_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for f in frames {
        let mut head = [0u8; 8];
        head[0] = f.kind;
        head[4..8].copy_from_slice(&(f.payload.len() as u32).to_le_bytes());
        let mut h = Xxh3::new();
        h.update(&head);
        h.update(&f.payload);
        let sum = h.digest() ^ u64::from(f.bad_sum);
        out.extend_from_slice(&head);
        out.extend_from_slice(&f.payload);
        out.extend_from_slice(&sum.to_le_bytes());
    }
    out
}

const SHARED: [u8; 16] = [7; 16];

fn client(store: &Arc<Store>, name: &str) -> AdminHandle {
    let config = ClientConfig {
        persistent_quota: 2 << 20,
        authorized_uuids: vec![Uuid::from_bytes(SHARED).expect("not nil")],
        ..ClientConfig::default()
    };
    store.add_client(name, config).expect("new client")
}

fn check_store(store: &Store) {
    let (used, overhead, limit) = (store.host_used(), store.host_overhead(), store.host_limit());
    assert!(used + overhead <= limit, "host {used} + {overhead} > {limit}");
    assert_eq!(store.recount_overhead(), overhead, "overhead counter drifted");
}

fn import(stream: &[u8], room_kib: u16) {
    let store = Store::new(StoreConfig {
        host_limit: (256 << 10) + (u64::from(room_kib) << 10),
    });
    let a = client(&store, "a");
    match a.data().import_image(&mut &stream[..]) {
        Err(_) => {
            let st = a.stats();
            assert!(st.pools.is_empty(), "a refused import left pools");
            assert_eq!(st.persistent_charged, 0, "a refused import left charges");
            assert_eq!(store.host_used(), 0, "a refused import left host charges");
        }
        Ok(sum) => {
            assert_eq!(sum.bytes, stream.len() as u64);
            let mut again = Vec::new();
            let out = a.data().export_image(&mut again).expect("export");
            assert_eq!(out.pools, sum.pools);
            // Persistent pages only travel: an import of pages into an
            // ephemeral pool (which a source never sends) may lose them.
            assert!(out.pages <= sum.pages);
            let b = client(&store, "b");
            // Room for a second copy is not guaranteed; a refusal must
            // leave nothing, an import the same client.
            match b.data().import_image(&mut again.as_slice()) {
                Ok(sum_b) => {
                    assert_eq!((sum_b.pools, sum_b.pages), (out.pools, out.pages));
                    assert_eq!(
                        b.stats().persistent_pages,
                        a.stats().persistent_pages,
                        "a re-import holds other pages"
                    );
                }
                Err(_) => assert!(b.stats().pools.is_empty()),
            }
        }
    }
    check_store(&store);
}

fuzz_target!(|input: Input| {
    import(&input.raw, input.room_kib);
    import(&sealed(&input.frames), input.room_kib);
});
