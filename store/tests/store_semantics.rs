// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Scenario tests of the store's semantics, limits and accounting.

use std::sync::Arc;

use vtmem_store::*;
use vtmem_testkit::{handle as h, random_page, same_filled_page as same_page, text_page};

const MIB: u64 = 1 << 20;
/// Room for allocator holes a client's domain may keep (one raw chunk per
/// shard) on top of what its pages are charged, for tests that fill a
/// small host exactly.
const HOLES: u64 = 2 * CHUNK_BYTES as u64;

fn store(limit: u64) -> Arc<Store> {
    Store::new(StoreConfig { host_limit: limit })
}

fn get(c: &DataHandle, handle: Handle) -> Option<Page> {
    let mut out = [0xAAu8; PAGE_SIZE];
    c.get(&handle, &mut out).unwrap().then_some(out)
}

/// host_used equals the sum the charging rule predicts.
fn assert_host_accounting(s: &Store) {
    let st = s.stats();
    let expect = st.data_bytes
        + st.unique_pages * CONTENT_METADATA_COST
        + st.stored_pages * PAGE_METADATA_COST
        + st.reserved_pages * RESERVED_PAGE_HOST_COST;
    assert_eq!(st.host_used, expect, "{st:#?}");
    assert!(st.host_used <= st.host_limit);
}

#[test]
fn store_and_handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
    check::<DataHandle>();
    check::<Arc<Store>>();
}

#[test]
fn persistent_put_get_flush() {
    let s = store(64 * MIB);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    for i in 0..100 {
        c.put(&h(p, 1, i), &text_page(i), false).unwrap();
    }
    for i in 0..100 {
        assert_eq!(get(&c, h(p, 1, i)), Some(text_page(i)));
        // Persistent gets keep the page.
        assert_eq!(get(&c, h(p, 1, i)), Some(text_page(i)));
    }
    assert_eq!(get(&c, h(p, 2, 0)), None);
    c.flush_page(&h(p, 1, 5)).unwrap();
    assert_eq!(get(&c, h(p, 1, 5)), None);
    c.flush_object(p, &ObjectId([1, 0, 0])).unwrap();
    assert_eq!(get(&c, h(p, 1, 6)), None);
    assert_eq!(c_admin.stats().persistent_pages, 0);
    assert_eq!(s.stats().host_used, 0);
}

#[test]
fn duplicate_put_replaces() {
    let s = store(64 * MIB);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    c.put(&h(p, 1, 0), &text_page(1), false).unwrap();
    c.put(&h(p, 1, 0), &random_page(2), false).unwrap();
    assert_eq!(get(&c, h(p, 1, 0)), Some(random_page(2)));
    c.put(&h(p, 1, 0), &[0u8; PAGE_SIZE], false).unwrap();
    assert_eq!(get(&c, h(p, 1, 0)), Some([0u8; PAGE_SIZE]));
    let st = c_admin.stats();
    assert_eq!((st.persistent_pages, st.zero_pages), (1, 1));
    assert_eq!(st.persistent_bytes, CLIENT_PAGE_COST);
    assert_host_accounting(&s);
}

#[test]
fn failed_put_drops_the_old_copy() {
    let s = store(64 * MIB);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    c.put(&h(p, 1, 0), &text_page(1), false).unwrap();
    c_admin.freeze();
    assert_eq!(
        c.put(&h(p, 1, 0), &text_page(2), false),
        Err(TmemError::Frozen)
    );
    assert_eq!(get(&c, h(p, 1, 0)), None, "old data must not survive");
    c_admin.thaw();
    // Reserved put without a reservation: refused, old copy dropped too.
    c.put(&h(p, 1, 1), &text_page(3), false).unwrap();
    assert_eq!(
        c.put(&h(p, 1, 1), &text_page(4), true),
        Err(TmemError::NoReservation)
    );
    assert_eq!(get(&c, h(p, 1, 1)), None);
    let st = c_admin.stats().counters;
    assert_eq!((st.puts_refused_frozen, st.puts_refused_other), (1, 1));
    assert_eq!(s.stats().host_used, 0);
}

#[test]
fn full_quota_rewrite_succeeds_by_dropping_the_old_copy() {
    let s = store(64 * MIB);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    // Quota for exactly one raw page.
    c_admin.set_quota(PAGE_SIZE as u64 + CLIENT_PAGE_COST, u64::MAX);
    c.put(&h(p, 1, 0), &random_page(1), false).unwrap();
    assert_eq!(
        c.put(&h(p, 1, 1), &random_page(2), false),
        Err(TmemError::OverQuota)
    );
    c.put(&h(p, 1, 0), &random_page(3), false).unwrap();
    assert_eq!(get(&c, h(p, 1, 0)), Some(random_page(3)));
}

#[test]
fn private_ephemeral_gets_are_exclusive() {
    let s = store(64 * MIB);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    // Even if the spec asks otherwise.
    let spec = PoolSpec {
        persistent: false,
        exclusive_gets: false,
        shared: None,
    };
    let p = c.new_pool(spec).unwrap();
    c.put(&h(p, 1, 0), &text_page(1), false).unwrap();
    assert_eq!(get(&c, h(p, 1, 0)), Some(text_page(1)));
    assert_eq!(get(&c, h(p, 1, 0)), None, "the hit removed the page");
    assert!(c_admin.stats().pools[0].exclusive_gets);
    assert_eq!(s.stats().host_used, 0);
}

#[test]
fn persistent_exclusive_gets_option() {
    let s = store(64 * MIB);
    let c = s.add_client("vm", ClientConfig::default()).unwrap().data();
    let spec = PoolSpec {
        persistent: true,
        exclusive_gets: true,
        shared: None,
    };
    let p = c.new_pool(spec).unwrap();
    c.put(&h(p, 1, 0), &text_page(1), false).unwrap();
    assert_eq!(get(&c, h(p, 1, 0)), Some(text_page(1)));
    assert_eq!(get(&c, h(p, 1, 0)), None);
}

#[test]
fn miss_leaves_output_untouched() {
    let s = store(64 * MIB);
    let c = s.add_client("vm", ClientConfig::default()).unwrap().data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    let mut out = [0x5Au8; PAGE_SIZE];
    assert!(!c.get(&h(p, 1, 0), &mut out).unwrap());
    assert!(out.iter().all(|&b| b == 0x5A));
}

#[test]
fn pool_limits_and_errors() {
    let s = store(64 * MIB);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let ids: Vec<u32> = (0..16)
        .map(|_| c.new_pool(PoolSpec::ephemeral()).unwrap())
        .collect();
    assert_eq!(ids, (0..16).collect::<Vec<_>>());
    assert_eq!(
        c.new_pool(PoolSpec::persistent()),
        Err(TmemError::TooManyPools)
    );
    c.destroy_pool(7).unwrap();
    assert_eq!(c.destroy_pool(7), Err(TmemError::NoPool));
    assert_eq!(c.new_pool(PoolSpec::persistent()), Ok(7));
    assert_eq!(
        c.put(&h(99, 0, 0), &text_page(0), false),
        Err(TmemError::NoPool)
    );
    let mut out = [0u8; PAGE_SIZE];
    assert_eq!(c.get(&h(99, 0, 0), &mut out), Err(TmemError::NoPool));
    assert_eq!(c.flush_page(&h(99, 0, 0)), Err(TmemError::NoPool));
    assert_eq!(
        c.reserve(0, 1),
        Err(TmemError::Invalid("reservations need a persistent pool"))
    );
    assert_eq!(
        c.new_pool(PoolSpec {
            persistent: true,
            exclusive_gets: false,
            shared: Some(Uuid::from_bytes([1; 16]).unwrap())
        }),
        Err(TmemError::Invalid("shared pools must be ephemeral"))
    );
    assert_eq!(
        c_admin.set_weight(0),
        Err(TmemError::Invalid("weight must be at least 1"))
    );
}

#[test]
fn shared_pools_need_authorisation_and_keep_pages_on_get() {
    let s = store(64 * MIB);
    let uuid = Uuid::from_bytes([7u8; 16]).unwrap();
    let a_admin = s
        .add_client(
            "a",
            ClientConfig {
                authorized_uuids: vec![uuid],
                ..Default::default()
            },
        )
        .unwrap();
    let a = a_admin.data();
    let b_admin = s.add_client("b", ClientConfig::default()).unwrap();
    let b = b_admin.data();
    assert_eq!(
        b.new_pool(PoolSpec::shared(uuid)),
        Err(TmemError::NotAuthorized)
    );
    let pa = a.new_pool(PoolSpec::shared(uuid)).unwrap();
    assert_eq!(
        a.new_pool(PoolSpec::shared(uuid)),
        Ok(pa),
        "same pool again"
    );
    b_admin.authorize(uuid);
    b.new_pool(PoolSpec::ephemeral()).unwrap();
    let pb = b.new_pool(PoolSpec::shared(uuid)).unwrap();
    assert_eq!(pb, 1);
    a.put(&h(pa, 1, 0), &text_page(1), false).unwrap();
    // b sees a's page, and gets keep it.
    assert_eq!(get(&b, h(pb, 1, 0)), Some(text_page(1)));
    assert_eq!(get(&a, h(pa, 1, 0)), Some(text_page(1)));
    b.put(&h(pb, 1, 1), &text_page(2), false).unwrap();
    // Each page is charged to the member that wrote it.
    let (sa, sb) = (a_admin.stats(), b_admin.stats());
    assert_eq!((sa.ephemeral_pages, sb.ephemeral_pages), (1, 1));
    assert_eq!(sa.ephemeral_bytes, sb.ephemeral_bytes);
    assert!(sb.ephemeral_bytes > 0);
    assert!(!sb.pools[1].owned);
    assert_eq!(sb.pools[1].pages, 2, "the pool's own gauges count both");
    // The creator leaves: the pool lives on, a's page charged to b now.
    a.destroy_pool(pa).unwrap();
    assert_eq!(get(&b, h(pb, 1, 0)), Some(text_page(1)));
    assert_eq!(a_admin.stats().ephemeral_bytes, 0);
    assert_eq!(b_admin.stats().ephemeral_pages, 2);
    assert!(b_admin.stats().pools[1].owned);
    // a rejoins the same pool.
    let pa = a.new_pool(PoolSpec::shared(uuid)).unwrap();
    assert_eq!(get(&a, h(pa, 1, 1)), Some(text_page(2)));
    b.destroy_pool(pb).unwrap();
    a.destroy_pool(pa).unwrap();
    // Last member gone: pool destroyed, a new one starts empty.
    let pa = a.new_pool(PoolSpec::shared(uuid)).unwrap();
    assert_eq!(get(&a, h(pa, 1, 1)), None);
    assert_eq!(s.stats().host_used, 0);
}

#[test]
fn ownership_transfer_respects_the_heirs_quota() {
    let s = store(64 * MIB);
    let uuid = Uuid::from_bytes([9u8; 16]).unwrap();
    let cfg = ClientConfig {
        authorized_uuids: vec![uuid],
        ..Default::default()
    };
    let a = s.add_client("a", cfg.clone()).unwrap().data();
    let b_admin = s.add_client("b", cfg).unwrap();
    let b = b_admin.data();
    let pa = a.new_pool(PoolSpec::shared(uuid)).unwrap();
    b.new_pool(PoolSpec::shared(uuid)).unwrap();
    for i in 0..100 {
        a.put(&h(pa, 1, i), &random_page(i), false).unwrap();
    }
    let quota = 10 * (PAGE_SIZE as u64 + CLIENT_PAGE_COST);
    b_admin.set_quota(u64::MAX, quota);
    a.destroy_pool(pa).unwrap();
    let st = b_admin.stats();
    assert!(st.ephemeral_bytes <= quota, "{st:?}");
    assert_eq!(st.ephemeral_pages, 10);
    assert_host_accounting(&s);
}

#[test]
fn zero_and_same_filled_pages_store_no_data() {
    let s = store(64 * MIB);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    c.put(&h(p, 1, 0), &[0u8; PAGE_SIZE], false).unwrap();
    c.put(&h(p, 1, 1), &same_page(0x0101_0101_0101_0101), false)
        .unwrap();
    c.put(&h(p, 1, 2), &same_page(u64::MAX), false).unwrap();
    let st = s.stats();
    assert_eq!(st.data_bytes, 0);
    assert_eq!(st.allocator_footprint, 0);
    assert_eq!((st.zero_pages, st.same_filled_pages), (1, 2));
    assert_eq!(get(&c, h(p, 1, 1)), Some(same_page(0x0101_0101_0101_0101)));
    assert_eq!(get(&c, h(p, 1, 2)), Some(same_page(u64::MAX)));
    assert_eq!(get(&c, h(p, 1, 0)), Some([0u8; PAGE_SIZE]));
    assert_eq!(c_admin.stats().persistent_bytes, 3 * CLIENT_PAGE_COST);
    assert_eq!(c_admin.stats().counters.zero_pages, 1);
    assert_host_accounting(&s);
}

#[test]
fn compression_and_raw_storage() {
    let s = store(64 * MIB);
    let c = s.add_client("vm", ClientConfig::default()).unwrap().data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    c.put(&h(p, 1, 0), &text_page(1), false).unwrap();
    let st = s.stats();
    assert!(st.data_bytes < PAGE_SIZE as u64 / 2, "{st:?}");
    assert!(st.compression_ratio > 2.0);
    assert_eq!(st.raw_pages, 0);
    c.put(&h(p, 1, 1), &random_page(1), false).unwrap();
    let st = s.stats();
    assert_eq!(st.raw_pages, 1);
    assert_eq!(get(&c, h(p, 1, 1)), Some(random_page(1)));
    assert!(st.counters.bytes_stored < st.counters.bytes_in);
    assert_host_accounting(&s);
}

#[test]
fn dedup_within_a_client_and_charges_each_page() {
    let s = store(64 * MIB);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    for i in 0..10 {
        c.put(&h(p, 1, i), &random_page(42), false).unwrap();
    }
    let st = s.stats();
    assert_eq!((st.stored_pages, st.unique_pages), (10, 1));
    assert_eq!(st.data_bytes, PAGE_SIZE as u64);
    assert!((st.dedup_ratio - 10.0).abs() < 1e-9);
    let cs = c_admin.stats();
    assert_eq!(cs.deduplicated_pages, 9);
    assert_eq!(cs.counters.dedup_hits, 9);
    // Each page charged in full to the client, once to the host.
    assert_eq!(
        cs.persistent_bytes,
        10 * (PAGE_SIZE as u64 + CLIENT_PAGE_COST)
    );
    assert_host_accounting(&s);
    for i in 0..10 {
        assert_eq!(get(&c, h(p, 1, i)), Some(random_page(42)));
    }
}

#[test]
fn dedup_across_clients_only_within_a_group() {
    let s = store(64 * MIB);
    let grp = ClientConfig {
        dedup_group: Some("g".into()),
        ..Default::default()
    };
    let a_admin = s.add_client("a", grp.clone()).unwrap();
    let a = a_admin.data();
    let b_admin = s.add_client("b", grp).unwrap();
    let b = b_admin.data();
    let c_admin = s.add_client("c", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let (pa, pb, pc) = (
        a.new_pool(PoolSpec::persistent()).unwrap(),
        b.new_pool(PoolSpec::persistent()).unwrap(),
        c.new_pool(PoolSpec::persistent()).unwrap(),
    );
    a.put(&h(pa, 1, 0), &random_page(5), false).unwrap();
    b.put(&h(pb, 1, 0), &random_page(5), false).unwrap();
    c.put(&h(pc, 1, 0), &random_page(5), false).unwrap();
    assert_eq!(b_admin.stats().counters.dedup_hits, 1, "same group shares");
    assert_eq!(
        c_admin.stats().counters.dedup_hits,
        0,
        "no group, no sharing"
    );
    assert_eq!(s.stats().unique_pages, 2);
    // Charges are equal whatever others hold: no quota side channel.
    assert_eq!(
        a_admin.stats().persistent_bytes,
        b_admin.stats().persistent_bytes
    );
    assert_eq!(
        a_admin.stats().persistent_bytes,
        c_admin.stats().persistent_bytes
    );
    // a's flush keeps b's page.
    a.flush_page(&h(pa, 1, 0)).unwrap();
    assert_eq!(get(&b, h(pb, 1, 0)), Some(random_page(5)));
    assert_host_accounting(&s);
}

#[test]
fn dedup_group_change_needs_an_empty_client() {
    let s = store(64 * MIB);
    let a_admin = s.add_client("a", ClientConfig::default()).unwrap();
    let a = a_admin.data();
    let b = s
        .add_client(
            "b",
            ClientConfig {
                dedup_group: Some("g".into()),
                ..Default::default()
            },
        )
        .unwrap()
        .data();
    let pa = a.new_pool(PoolSpec::persistent()).unwrap();
    let pb = b.new_pool(PoolSpec::persistent()).unwrap();
    assert_eq!(a.reserve(pa, 3), Ok(3));
    a.put(&h(pa, 1, 0), &random_page(1), false).unwrap();
    assert_eq!(
        a_admin.set_dedup_group(Some("g".into())),
        Err(TmemError::Busy("the client holds pages"))
    );
    a.flush_page(&h(pa, 1, 0)).unwrap();
    a_admin.set_dedup_group(Some("g".into())).unwrap();
    assert_eq!(a_admin.config().dedup_group.as_deref(), Some("g"));
    // Pools and reservations carried over; dedup now reaches b.
    assert_eq!(a_admin.stats().reserved_pages, 3);
    b.put(&h(pb, 1, 0), &random_page(1), false).unwrap();
    a.put(&h(pa, 1, 0), &random_page(1), true).unwrap();
    assert_eq!(a_admin.stats().counters.dedup_hits, 1);
    assert_eq!(a_admin.stats().reserved_pages, 2);
    assert_host_accounting(&s);
}

#[test]
fn persistent_quota_is_exact_and_lowering_it_keeps_pages() {
    let s = store(64 * MIB);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    let per = PAGE_SIZE as u64 + CLIENT_PAGE_COST;
    c_admin.set_quota(5 * per, u64::MAX);
    for i in 0..5 {
        c.put(&h(p, 1, i), &random_page(i), false).unwrap();
    }
    assert_eq!(
        c.put(&h(p, 1, 5), &random_page(5), false),
        Err(TmemError::OverQuota)
    );
    // Zero pages still cost their metadata.
    assert_eq!(
        c.put(&h(p, 1, 6), &[0u8; PAGE_SIZE], false),
        Err(TmemError::OverQuota)
    );
    c_admin.set_quota(per, u64::MAX);
    for i in 0..5 {
        assert_eq!(get(&c, h(p, 1, i)), Some(random_page(i)));
    }
    assert_eq!(c_admin.stats().counters.puts_refused_quota, 2);
}

#[test]
fn ephemeral_quota_evicts_own_oldest_pages() {
    let s = store(64 * MIB);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let p = c.new_pool(PoolSpec::ephemeral()).unwrap();
    let per = PAGE_SIZE as u64 + CLIENT_PAGE_COST;
    c_admin.set_quota(u64::MAX, 50 * per);
    for i in 0..200 {
        c.put(&h(p, 1, i), &random_page(i), false).unwrap();
    }
    let st = c_admin.stats();
    assert!(st.ephemeral_bytes <= 50 * per);
    assert!(st.ephemeral_pages >= 40, "{st:?}");
    // The newest survive, the oldest went.
    assert_eq!(get(&c, h(p, 1, 199)), Some(random_page(199)));
    assert_eq!(get(&c, h(p, 1, 0)), None);
    assert!(c_admin.stats().counters.evictions >= 150);
    // Lowering the quota evicts at once.
    c_admin.set_quota(u64::MAX, 10 * per);
    assert!(c_admin.stats().ephemeral_bytes <= 10 * per);
    assert_host_accounting(&s);
}

#[test]
fn host_limit_persistent_never_evicted_ephemeral_evicted() {
    let per_host = PAGE_SIZE as u64 + CONTENT_METADATA_COST + PAGE_METADATA_COST;
    let s = store(100 * per_host + HOLES);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let e = c.new_pool(PoolSpec::ephemeral()).unwrap();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    for i in 0..60 {
        c.put(&h(e, 1, i), &random_page(1000 + i), false).unwrap();
    }
    // Persistent puts may evict ephemeral pages to make room, until the
    // host is full of persistent pages.
    let mut stored = 0;
    while c.put(&h(p, 1, stored), &random_page(stored), false).is_ok() {
        stored += 1;
    }
    assert!(stored >= 100, "{stored} persistent pages fit");
    assert_eq!(c_admin.stats().ephemeral_pages, 0);
    let st = s.stats();
    assert!(st.host_used + st.host_overhead <= st.host_limit, "{st:#?}");
    // Full of persistent pages: both kinds refused now.
    assert_eq!(
        c.put(&h(p, 1, stored), &random_page(stored), false),
        Err(TmemError::NoSpace)
    );
    assert_eq!(
        c.put(&h(e, 1, 0), &random_page(7), false),
        Err(TmemError::NoSpace)
    );
    for i in 0..stored {
        assert_eq!(get(&c, h(p, 1, i)), Some(random_page(i)));
    }
    // Lowering the limit never drops persistent pages.
    s.set_host_limit(10 * per_host);
    assert_eq!(c_admin.stats().persistent_pages, stored);
    s.set_host_limit(200 * per_host);
    assert_host_accounting(&s);
}

#[test]
fn lowering_the_host_limit_evicts_at_once() {
    let s = store(64 * MIB);
    let c = s.add_client("vm", ClientConfig::default()).unwrap().data();
    let e = c.new_pool(PoolSpec::ephemeral()).unwrap();
    for i in 0..500 {
        c.put(&h(e, 1, i), &random_page(i), false).unwrap();
    }
    s.set_host_limit(MIB);
    let st = s.stats();
    assert!(st.host_used <= MIB);
    assert!(
        st.stored_pages > 200,
        "evicts only what it must: {}",
        st.stored_pages
    );
    assert_host_accounting(&s);
}

#[test]
fn reservations_guarantee_puts() {
    let per_host = RESERVED_PAGE_HOST_COST;
    let s = store(200 * per_host);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let other_admin = s.add_client("other", ClientConfig::default()).unwrap();
    let other = other_admin.data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    let e = other.new_pool(PoolSpec::ephemeral()).unwrap();
    for i in 0..180 {
        other
            .put(&h(e, 1, i), &random_page(500 + i), false)
            .unwrap();
    }
    // Reserving evicts the other client's ephemeral pages.
    assert_eq!(c.reserve(p, 40), Ok(40));
    assert!(other_admin.stats().ephemeral_pages < 180);
    // The rest of the host fills with persistent pages of the other client.
    let q = other.new_pool(PoolSpec::persistent()).unwrap();
    let mut i = 0;
    while other.put(&h(q, 1, i), &random_page(900 + i), false).is_ok() {
        i += 1;
    }
    // Frozen and full, reserved puts still succeed.
    c_admin.freeze();
    c_admin.set_quota(0, 0);
    for i in 0..40 {
        c.put(&h(p, 1, i), &random_page(i), true).unwrap();
    }
    assert_eq!(
        c.put(&h(p, 1, 40), &random_page(40), true),
        Err(TmemError::NoReservation)
    );
    assert_eq!(
        c.put(&h(p, 1, 41), &random_page(41), false),
        Err(TmemError::Frozen)
    );
    for i in 0..40 {
        assert_eq!(get(&c, h(p, 1, i)), Some(random_page(i)));
    }
    assert_host_accounting(&s);
    c_admin.thaw();
    c_admin.set_quota(u64::MAX, u64::MAX);
    // Reserve, unreserve, and destroy release the charge.
    let before = s.stats().host_used;
    for i in 0..40 {
        c.flush_page(&h(p, 1, i)).unwrap();
    }
    let granted = c.reserve(p, 10).unwrap();
    assert!(granted > 0);
    assert_eq!(c.unreserve(p, 3), Ok(granted - 3));
    assert_eq!(c_admin.stats().reserved_pages, granted - 3);
    assert_host_accounting(&s);
    c.destroy_pool(p).unwrap();
    assert_eq!(c_admin.stats().persistent_charged, 0);
    assert!(s.stats().host_used < before);
    assert_host_accounting(&s);
}

#[test]
fn reservation_is_bounded_by_quota_and_host() {
    let s = store(10 * RESERVED_PAGE_HOST_COST);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    c_admin.set_quota(4 * RESERVED_PAGE_CLIENT_COST, u64::MAX);
    assert_eq!(c.reserve(p, u64::MAX), Ok(4));
    c_admin.set_quota(u64::MAX, u64::MAX);
    assert_eq!(c.reserve(p, 100), Ok(6));
    assert_eq!(c.reserve(p, 1), Ok(0));
    assert_eq!(c_admin.stats().reserved_pages, 10);
    // A reserved page's real cost is charged once spent: compressed pages
    // free most of it again.
    c.put(&h(p, 1, 0), &text_page(1), true).unwrap();
    assert!(s.stats().host_used < 10 * RESERVED_PAGE_HOST_COST);
    assert_host_accounting(&s);
}

#[test]
fn reset_and_remove_client_free_everything() {
    let uuid = Uuid::from_bytes([3u8; 16]).unwrap();
    let s = store(64 * MIB);
    let cfg = ClientConfig {
        authorized_uuids: vec![uuid],
        ..Default::default()
    };
    let a_admin = s.add_client("a", cfg.clone()).unwrap();
    let a = a_admin.data();
    let b_admin = s.add_client("b", cfg).unwrap();
    let b = b_admin.data();
    let pa = a.new_pool(PoolSpec::persistent()).unwrap();
    let sa = a.new_pool(PoolSpec::shared(uuid)).unwrap();
    let sb = b.new_pool(PoolSpec::shared(uuid)).unwrap();
    a.reserve(pa, 5).unwrap();
    for i in 0..50 {
        a.put(&h(pa, 1, i), &text_page(i), false).unwrap();
        a.put(&h(sa, 1, i), &text_page(1000 + i), false).unwrap();
    }
    a.reset();
    assert_eq!(a_admin.stats().pools.len(), 0);
    assert_eq!(a_admin.stats().persistent_charged, 0);
    assert_eq!(
        get(&b, h(sb, 1, 3)),
        Some(text_page(1003)),
        "shared pool lives on"
    );
    assert_eq!(b_admin.stats().ephemeral_pages, 50);
    let pa = a.new_pool(PoolSpec::persistent()).unwrap();
    a.put(&h(pa, 1, 0), &text_page(0), false).unwrap();
    assert_eq!(s.client_names(), vec!["a".to_string(), "b".to_string()]);
    // Looking a client up from a plain reference gives a working handle.
    let by_ref: &Store = &s;
    let again = by_ref.client("a").unwrap();
    assert_eq!(again.name(), "a");
    assert_eq!(get(&again.data(), h(pa, 1, 0)), Some(text_page(0)));
    s.remove_client("a").unwrap();
    assert_eq!(
        a.put(&h(pa, 1, 0), &text_page(0), false),
        Err(TmemError::ClientGone)
    );
    assert_eq!(
        a.new_pool(PoolSpec::persistent()),
        Err(TmemError::ClientGone)
    );
    assert!(s.client("a").is_none());
    assert_eq!(
        s.remove_client("a"),
        Err(TmemError::UnknownClient("a".into()))
    );
    assert_eq!(
        s.add_client("b", ClientConfig::default()).err(),
        Some(TmemError::ClientExists("b".into()))
    );
    s.remove_client("b").unwrap();
    let st = s.stats();
    assert_eq!(
        (st.host_used, st.stored_pages, st.allocator_footprint),
        (0, 0, 0)
    );
    // Counters of removed clients stay in the global total.
    assert_eq!(st.counters.puts, 101);
}

#[test]
fn flush_all_keeps_pools() {
    let s = store(64 * MIB);
    let c_admin = s.add_client("vm", ClientConfig::default()).unwrap();
    let c = c_admin.data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    let e = c.new_pool(PoolSpec::ephemeral()).unwrap();
    for i in 0..10 {
        c.put(&h(p, 1, i), &text_page(i), false).unwrap();
        c.put(&h(e, 1, i), &text_page(i), false).unwrap();
    }
    c_admin.flush_all(true);
    let st = c_admin.stats();
    assert_eq!((st.persistent_pages, st.ephemeral_pages), (10, 0));
    c_admin.flush_all(false);
    assert_eq!(c_admin.stats().persistent_pages, 0);
    c.put(&h(p, 1, 0), &text_page(0), false).unwrap();
    assert_eq!(get(&c, h(p, 1, 0)), Some(text_page(0)));
}

#[test]
fn weights_share_ephemeral_capacity() {
    let per_host = PAGE_SIZE as u64 + CONTENT_METADATA_COST + PAGE_METADATA_COST;
    let s = store(4000 * per_host);
    let light_admin = s
        .add_client(
            "light",
            ClientConfig {
                weight: 100,
                ..Default::default()
            },
        )
        .unwrap();
    let light = light_admin.data();
    let heavy_admin = s
        .add_client(
            "heavy",
            ClientConfig {
                weight: 300,
                ..Default::default()
            },
        )
        .unwrap();
    let heavy = heavy_admin.data();
    let pl = light.new_pool(PoolSpec::ephemeral()).unwrap();
    let ph = heavy.new_pool(PoolSpec::ephemeral()).unwrap();
    for i in 0..8000 {
        light.put(&h(pl, 1, i), &random_page(i), false).unwrap();
    }
    for round in 0..3u64 {
        for i in 0..4000 {
            let k = 10_000 * (round + 1) + i;
            heavy.put(&h(ph, 1, k), &random_page(k), false).unwrap();
            light.put(&h(pl, 2, k), &random_page(k + 5), false).unwrap();
        }
    }
    let l = light_admin.stats().ephemeral_pages as f64;
    let hv = heavy_admin.stats().ephemeral_pages as f64;
    let ratio = hv / l;
    assert!((2.5..3.5).contains(&ratio), "heavy {hv} light {l}");
    assert_host_accounting(&s);
}

#[test]
fn stats_report_metadata_and_fragmentation() {
    let s = store(256 * MIB);
    let c = s.add_client("vm", ClientConfig::default()).unwrap().data();
    let p = c.new_pool(PoolSpec::persistent()).unwrap();
    for i in 0..4096 {
        c.put(&h(p, 1, i), &text_page(i), false).unwrap();
    }
    let st = s.stats();
    assert!(st.metadata_bytes > 0);
    assert!(
        st.metadata_bytes_per_page < 64.0,
        "metadata {} B/page",
        st.metadata_bytes_per_page
    );
    assert!(st.allocator_footprint >= st.data_bytes);
    assert!((0.0..1.0).contains(&st.fragmentation));
    let json = serde_json::to_string(&st).unwrap();
    assert!(json.contains("metadata_bytes"));
    c.flush_object(p, &ObjectId([1, 0, 0])).unwrap();
    let st = s.stats();
    assert_eq!(
        (st.host_used, st.allocator_footprint, st.data_bytes),
        (0, 0, 0)
    );
}

#[test]
fn deauthorize_expels_from_a_joined_shared_pool() {
    let s = store(64 * MIB);
    let uuid = Uuid::from_bytes([5u8; 16]).unwrap();
    let auth = || ClientConfig {
        authorized_uuids: vec![uuid],
        ..Default::default()
    };
    let a_admin = s.add_client("a", auth()).unwrap();
    let a = a_admin.data();
    let b_admin = s.add_client("b", auth()).unwrap();
    let b = b_admin.data();
    let pa = a.new_pool(PoolSpec::shared(uuid)).unwrap();
    let pb = b.new_pool(PoolSpec::shared(uuid)).unwrap();
    let private = b.new_pool(PoolSpec::ephemeral()).unwrap();
    b.put(&h(pb, 1, 0), &text_page(1), false).unwrap();
    b.put(&h(private, 1, 0), &text_page(2), false).unwrap();
    assert_eq!(b_admin.deauthorize(uuid), 1);
    // b's id for the shared pool is gone, its private pool stays...
    assert_eq!(
        b.put(&h(pb, 1, 1), &text_page(3), false),
        Err(TmemError::NoPool)
    );
    assert_eq!(get(&b, h(private, 1, 0)), Some(text_page(2)));
    assert_eq!(
        b.new_pool(PoolSpec::shared(uuid)),
        Err(TmemError::NotAuthorized)
    );
    // ...and the shared pool's pages stay for a.
    assert_eq!(get(&a, h(pa, 1, 0)), Some(text_page(1)));
    assert!(b_admin.stats().config.authorized_uuids.is_empty());
    // Deauthorising again, or a UUID never joined, closes nothing.
    assert_eq!(b_admin.deauthorize(uuid), 0);
    assert_eq!(a_admin.deauthorize(Uuid::from_bytes([6u8; 16]).unwrap()), 0);
}

#[test]
fn stats_show_uuids_as_text_and_read_both_forms() {
    let s = store(64 * MIB);
    let uuid = Uuid::from_bytes([0xab; 16]).unwrap();
    let a = s
        .add_client(
            "a",
            ClientConfig {
                authorized_uuids: vec![uuid],
                ..Default::default()
            },
        )
        .unwrap()
        .data();
    a.new_pool(PoolSpec::shared(uuid)).unwrap();
    let text = "abababab-abab-abab-abab-abababababab";
    let v = serde_json::to_value(s.stats()).unwrap();
    assert_eq!(v["clients"][0]["config"]["authorized_uuids"][0], text);
    assert_eq!(v["clients"][0]["pools"][0]["shared"], text);
    let back: vtmem_store::StoreStats = serde_json::from_value(v).unwrap();
    assert_eq!(back.clients[0].config.authorized_uuids, vec![uuid]);
}

// ---- tenants that do not trust each other ---------------------------------

/// Fills `c`'s ephemeral pool with distinct incompressible pages until the
/// host is nearly full or `max` pages are in; returns how many went in.
fn fill_ephemeral(c: &DataHandle, pool: u32, seed: u64, max: u64) -> u64 {
    let mut n = 0;
    while n < max && c.put(&h(pool, 9, n), &random_page(seed + n), false).is_ok() {
        n += 1;
    }
    n
}

/// One RESERVE of u64::MAX on the default configuration (unlimited quotas)
/// used to be granted every free page of the host, evicting everyone
/// else's cache pages, and then overflowed its charge arithmetic.
#[test]
fn reserve_of_everything_leaves_the_neighbour_its_share() {
    let limit = 32 * MIB;
    let s = store(limit);
    let a = s.add_client("a", ClientConfig::default()).unwrap().data();
    let b = s.add_client("b", ClientConfig::default()).unwrap();
    let bd = b.data();
    let eph = bd.new_pool(PoolSpec::ephemeral()).unwrap();
    // The neighbour holds a cache of 60 % of the host, above its half share.
    let cached = fill_ephemeral(&bd, eph, 1, (limit * 6 / 10) / 4200);
    assert!(cached > 0);
    let pa = a.new_pool(PoolSpec::persistent()).unwrap();

    let mut granted = 0;
    loop {
        let g = a.reserve(pa, u64::MAX).unwrap();
        assert!(g <= MAX_RESERVE_PAGES, "one request granted {g} pages");
        if g == 0 {
            break;
        }
        granted += g;
    }
    let share = limit / 2;
    assert!(
        granted * RESERVED_PAGE_HOST_COST <= share,
        "granted {granted} pages, more than the half share"
    );
    assert!(granted > 0);
    // The neighbour's cache was evicted at most down to its share.
    let st = b.stats();
    assert!(
        st.ephemeral_bytes >= share.min(cached * 4096) - 4 * RESERVED_PAGE_CLIENT_COST,
        "neighbour's cache cut below its share: {} bytes",
        st.ephemeral_bytes
    );
    // And it can still swap: its persistent puts succeed.
    let pb = bd.new_pool(PoolSpec::persistent()).unwrap();
    for i in 0..64 {
        bd.put(&h(pb, 1, i), &random_page(10_000 + i), false)
            .unwrap_or_else(|e| panic!("neighbour's persistent put {i}: {e}"));
    }
    assert!(s.host_used() <= limit);

    // Nothing leaked: giving everything back returns the charges exactly.
    assert_eq!(a.unreserve(pa, u64::MAX).unwrap(), 0);
    assert_host_accounting(&s);
    a.destroy_pool(pa).unwrap();
    bd.destroy_pool(pb).unwrap();
    bd.destroy_pool(eph).unwrap();
    assert_eq!(s.host_used(), 0);
}

/// `used + extra` overflowed when a reservation asked for u64::MAX pages
/// with an unlimited quota.
#[test]
fn huge_requests_never_overflow_the_charges() {
    let s = store(8 * MIB);
    let a = s.add_client("a", ClientConfig::default()).unwrap();
    let ad = a.data();
    let p = ad.new_pool(PoolSpec::persistent()).unwrap();
    // Something is stored, so the host counter is not zero.
    ad.put(&h(p, 1, 0), &random_page(1), false).unwrap();
    let used = s.host_used();
    let charged = a.stats().persistent_charged;
    for pages in [u64::MAX, u64::MAX / RESERVED_PAGE_CLIENT_COST + 1, 1 << 62] {
        let g = ad.reserve(p, pages).unwrap();
        assert!(g * RESERVED_PAGE_HOST_COST <= 8 * MIB);
        assert_eq!(ad.unreserve(p, g).unwrap(), 0);
        assert_eq!(s.host_used(), used);
        assert_eq!(a.stats().persistent_charged, charged);
    }
}

/// Two VMs in one dedup group, the host full. Whether a PUT is admitted
/// must not tell one VM whether the other holds that page.
#[test]
fn admission_does_not_reveal_a_neighbours_pages() {
    let cfg = ClientConfig {
        dedup_group: Some("g".into()),
        ..Default::default()
    };
    let s = store(4 * MIB);
    let victim = s.add_client("victim", cfg.clone()).unwrap().data();
    let prober = s.add_client("prober", cfg).unwrap().data();
    let vp = victim.new_pool(PoolSpec::persistent()).unwrap();
    let secret = random_page(0x5ec2e7);
    victim.put(&h(vp, 1, 0), &secret, false).unwrap();
    // The prober fills the host with its own persistent pages. A refusal
    // means the page's own content shard had no slot left; other shards
    // may still have one, so it goes on until 512 fresh pages in a row
    // were refused: every shard is full then (a shard that a random page
    // misses 512 times in a row is a 1 in 10^14 event).
    let pp = prober.new_pool(PoolSpec::persistent()).unwrap();
    let (mut i, mut refused_in_a_row) = (0, 0);
    while refused_in_a_row < 512 {
        match prober.put(&h(pp, 2, i), &random_page(1 << 40 | i), false) {
            Ok(()) => refused_in_a_row = 0,
            Err(e) => {
                assert_eq!(e, TmemError::NoSpace);
                refused_in_a_row += 1;
            }
        }
        i += 1;
    }
    let fresh = prober.put(&h(pp, 3, 0), &random_page(0xf2e54), false);
    let probe = prober.put(&h(pp, 3, 1), &secret, false);
    assert_eq!(fresh, Err(TmemError::NoSpace));
    assert_eq!(
        probe, fresh,
        "a page the neighbour holds was admitted where a fresh one was not"
    );
    // With room again (in every content shard: 256 pages freed), both
    // kinds are admitted alike.
    for j in 0..256 {
        prober.flush_page(&h(pp, 2, j)).unwrap();
    }
    assert_eq!(
        prober.put(&h(pp, 3, 0), &random_page(0xf2e54), false),
        Ok(())
    );
    assert_eq!(prober.put(&h(pp, 3, 1), &secret, false), Ok(()));
    assert_host_accounting(&s);
}

/// A member that wrote 1000 pages into a shared pool was charged nothing,
/// and the pool's owner lost its private cache to make room for them.
#[test]
fn shared_pool_pages_are_charged_to_their_writer() {
    let per_page = PAGE_SIZE as u64 + CLIENT_PAGE_COST;
    let s = store(2000 * per_page);
    let uuid = Uuid::from_bytes([0x33; 16]).unwrap();
    let cfg = ClientConfig {
        authorized_uuids: vec![uuid],
        ..Default::default()
    };
    let owner_admin = s.add_client("owner", cfg.clone()).unwrap();
    let owner = owner_admin.data();
    let writer_admin = s.add_client("writer", cfg).unwrap();
    let writer = writer_admin.data();
    let so = owner.new_pool(PoolSpec::shared(uuid)).unwrap();
    let sw = writer.new_pool(PoolSpec::shared(uuid)).unwrap();
    let private = owner.new_pool(PoolSpec::ephemeral()).unwrap();
    for i in 0..800 {
        owner
            .put(&h(private, 1, i), &random_page(i), false)
            .unwrap();
    }
    for i in 0..1000 {
        writer
            .put(&h(sw, 1, i), &random_page(10_000 + i), false)
            .unwrap();
    }
    let (o, w) = (owner_admin.stats(), writer_admin.stats());
    assert_eq!(w.ephemeral_pages, 1000, "{w:?}");
    assert_eq!(w.ephemeral_bytes, 1000 * per_page);
    assert_eq!(o.ephemeral_pages, 800, "the owner's cache is untouched");
    assert_eq!(o.ephemeral_bytes, 800 * per_page);

    // Over the host, the writer (above its half share) loses its own
    // pages, never the owner's (below its share).
    for i in 1000..1800 {
        writer
            .put(&h(sw, 1, i), &random_page(10_000 + i), false)
            .unwrap();
    }
    assert_eq!(owner_admin.stats().ephemeral_pages, 800);
    assert!(writer_admin.stats().counters.evictions > 0);

    // The writer's ephemeral quota holds its writes to the shared pool.
    writer_admin.set_quota(u64::MAX, 100 * per_page);
    assert!(writer_admin.stats().ephemeral_bytes <= 100 * per_page);
    writer.put(&h(sw, 2, 0), &random_page(99), false).unwrap();
    assert!(writer_admin.stats().ephemeral_bytes <= 100 * per_page);
    assert_eq!(owner_admin.stats().ephemeral_pages, 800);
    // The owner reads what the writer wrote.
    assert_eq!(get(&owner, h(so, 2, 0)), Some(random_page(99)));

    // The writer leaves: its pages stay for the owner, charged to it now.
    let left = writer_admin.stats().ephemeral_bytes;
    writer.destroy_pool(sw).unwrap();
    assert_eq!(writer_admin.stats().ephemeral_bytes, 0);
    assert_eq!(owner_admin.stats().ephemeral_bytes, 800 * per_page + left);
    assert_eq!(get(&owner, h(so, 2, 0)), Some(random_page(99)));
    assert_host_accounting(&s);
}
