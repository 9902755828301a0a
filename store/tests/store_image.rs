// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A client's image (the device state of live migration): round trips of
//! every pool and page kind, and every way a stream can be refused, with
//! nothing left behind on the importing side and nothing changed on the
//! exporting one.

use std::sync::Arc;

use vtmem_store::*;
use vtmem_testkit::{handle as h, random_page, same_filled_page, sized_page, text_page, zero_page};

const MIB: u64 = 1 << 20;
const SHARED: Uuid = match Uuid::from_bytes([7; 16]) {
    Some(u) => u,
    None => panic!(),
};

fn store(limit: u64) -> Arc<Store> {
    Store::new(StoreConfig { host_limit: limit })
}

fn config() -> ClientConfig {
    ClientConfig {
        authorized_uuids: vec![SHARED],
        ..ClientConfig::default()
    }
}

fn get(c: &DataHandle, handle: Handle) -> Option<Page> {
    let mut out = [0xAAu8; PAGE_SIZE];
    c.get(&handle, &mut out).unwrap().then_some(out)
}

/// Every page kind: zero, same-filled, compressible, raw (incompressible),
/// deduplicated (the same content under two handles), a barely
/// compressible page.
fn page_of(i: u64) -> Page {
    match i % 6 {
        0 => zero_page(),
        1 => same_filled_page(0x0101_0101_0101_0101 * (i % 200 + 1)),
        2 => text_page(i),
        3 => random_page(i),
        4 => text_page(1_000_000), // one content, many handles
        _ => sized_page(i, 3000),
    }
}

/// Pool ids on the source: 0 persistent, 1 ephemeral, 2 shared, 3
/// persistent with exclusive gets (2 is left open by a destroyed pool
/// first so that ids are not simply 0..n).
struct Source {
    store: Arc<Store>,
    admin: AdminHandle,
    data: DataHandle,
    pages: u64,
}

fn source(pages: u64) -> Source {
    let store = store(256 * MIB);
    let admin = store.add_client("src", config()).unwrap();
    let data = admin.data();
    assert_eq!(data.new_pool(PoolSpec::persistent()).unwrap(), 0);
    assert_eq!(data.new_pool(PoolSpec::ephemeral()).unwrap(), 1);
    assert_eq!(data.new_pool(PoolSpec::persistent()).unwrap(), 2);
    let excl = PoolSpec {
        exclusive_gets: true,
        ..PoolSpec::persistent()
    };
    assert_eq!(data.new_pool(excl).unwrap(), 3);
    data.destroy_pool(2).unwrap();
    assert_eq!(data.new_pool(PoolSpec::shared(SHARED)).unwrap(), 2);
    for i in 0..pages {
        data.put(&h(0, i / 100, i), &page_of(i), false).unwrap();
        data.put(&h(3, 9, i), &page_of(i + 3), false).unwrap();
        // Contents no persistent page has: the source's dedup counts are
        // then the persistent pools' alone.
        data.put(&h(1, 1, i), &text_page(i + 10_000_000), false)
            .unwrap();
        data.put(&h(2, 1, i), &text_page(i + 10_000_000), false)
            .unwrap();
    }
    assert_eq!(data.reserve(0, 40).unwrap(), 40);
    assert_eq!(data.reserve(3, 7).unwrap(), 7);
    Source {
        store,
        admin,
        data,
        pages,
    }
}

fn export(d: &DataHandle) -> (Vec<u8>, ImageSummary) {
    let mut out = Vec::new();
    let sum = d.export_image(&mut out).unwrap();
    assert_eq!(sum.bytes, out.len() as u64);
    (out, sum)
}

/// What a client holds, for comparing before and after.
fn held(a: &AdminHandle) -> (u64, u64, u64, u64, usize) {
    let st = a.stats();
    (
        st.persistent_pages,
        st.persistent_bytes,
        st.reserved_pages,
        st.persistent_charged,
        st.pools.len(),
    )
}

fn assert_empty(s: &Store, a: &AdminHandle) {
    assert_eq!(held(a), (0, 0, 0, 0, 0), "the failed import left something");
    let st = s.stats();
    assert_eq!(st.host_used, 0, "{st:#?}");
    assert_eq!(st.stored_pages, 0);
}

#[test]
fn round_trip_of_every_pool_and_page_kind() {
    let src = source(600);
    let before = held(&src.admin);
    let host_before = src.store.stats().host_used;
    let (image, sum) = export(&src.data);
    assert_eq!(src.store.stats().host_used, host_before);
    assert_eq!(sum.pools, 4);
    assert_eq!(sum.pages, 2 * src.pages, "persistent pages only");
    // Exporting changes nothing on the source.
    assert_eq!(held(&src.admin), before);

    let dst = store(256 * MIB);
    let admin = dst.add_client("dst", config()).unwrap();
    let data = admin.data();
    let got = data.import_image(&mut image.as_slice()).unwrap();
    assert_eq!(got, sum);
    // Every page kind kept its kind (100 zero and 100 same-filled pages a
    // persistent pool), and what was deduplicated is deduplicated again.
    let st = admin.stats();
    let src_st = src.admin.stats();
    assert_eq!(
        (st.zero_pages, st.same_filled_pages, st.deduplicated_pages),
        (200, 200, src_st.deduplicated_pages),
        "{st:#?}"
    );
    assert!(st.deduplicated_pages >= 199);

    // Byte-identical gets, same pool ids, same charges and reservations.
    for i in 0..src.pages {
        assert_eq!(get(&data, h(0, i / 100, i)), Some(page_of(i)), "page {i}");
    }
    for i in 0..src.pages {
        // Exclusive gets: the imported pool still removes on get.
        assert_eq!(get(&data, h(3, 9, i)), Some(page_of(i + 3)));
        assert_eq!(get(&data, h(3, 9, i)), None);
    }
    for i in (0..src.pages).step_by(97) {
        // Ephemeral and shared pools keep their ids and miss.
        assert_eq!(get(&data, h(1, 1, i)), None);
        assert_eq!(get(&data, h(2, 1, i)), None);
    }
    let st = admin.stats();
    assert_eq!(st.pools.len(), 4);
    let kinds: Vec<_> = st
        .pools
        .iter()
        .map(|p| {
            (
                p.id,
                p.persistent,
                p.shared.is_some(),
                p.exclusive_gets,
                p.reserved_pages,
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, true, false, false, 40),
            (1, false, false, true, 0),
            (2, false, true, false, 0),
            (3, true, false, true, 7),
        ]
    );
    let src_pool0 = src.admin.stats().pools[0].clone();
    assert_eq!(
        (st.pools[0].pages, st.pools[0].bytes),
        (src_pool0.pages, src_pool0.bytes)
    );
    // The store's accounting is exact after the import.
    assert_eq!(dst.recount_overhead(), dst.stats().host_overhead);

    // A second import replaces everything the client held.
    data.put(&h(0, 5000, 1), &text_page(5), false).unwrap();
    data.import_image(&mut image.as_slice()).unwrap();
    assert_eq!(get(&data, h(0, 5000, 1)), None);
    assert_eq!(get(&data, h(3, 9, 0)), Some(page_of(3)));
}

#[test]
fn an_image_is_the_same_whatever_the_dedup_scope() {
    // The destination dedups by its own groups: two clients of one group
    // share content, and an import into that group is charged the same.
    let src = source(120);
    let (image, _) = export(&src.data);
    let dst = store(256 * MIB);
    let grouped = ClientConfig {
        dedup_group: Some("g".into()),
        ..config()
    };
    let other = dst.add_client("other", grouped.clone()).unwrap().data();
    let p = other.new_pool(PoolSpec::persistent()).unwrap();
    other
        .put(&h(p, 1, 1), &text_page(1_000_000), false)
        .unwrap();
    let admin = dst.add_client("dst", grouped).unwrap();
    admin.data().import_image(&mut image.as_slice()).unwrap();
    assert_eq!(held(&admin).1, held(&src.admin).1, "charged as if alone");
    assert_eq!(get(&admin.data(), h(0, 0, 4)), Some(text_page(1_000_000)));
}

#[test]
fn corrupt_streams_are_refused_and_leave_nothing() {
    let src = source(200);
    let before = held(&src.admin);
    let (image, _) = export(&src.data);
    let dst = store(256 * MIB);
    let admin = dst.add_client("dst", config()).unwrap();
    let data = admin.data();
    // A flipped bit anywhere: in the prefix, a frame header, a payload, a
    // checksum. Every 997th byte and the last ones.
    let positions: Vec<usize> = (0..image.len())
        .step_by(997)
        .chain(image.len() - 30..image.len())
        .collect();
    for pos in positions {
        let mut bad = image.clone();
        bad[pos] ^= 0x10;
        let err = data.import_image(&mut bad.as_slice()).unwrap_err();
        assert!(
            !matches!(err, ImageError::Io(_)),
            "byte {pos}: not an I/O error: {err}"
        );
        assert_empty(&dst, &admin);
    }
    // Bytes after the end frame.
    let mut long = image.clone();
    long.push(0);
    assert!(matches!(
        data.import_image(&mut long.as_slice()),
        Err(ImageError::Malformed(_))
    ));
    assert_empty(&dst, &admin);
    assert_eq!(held(&src.admin), before);
}

#[test]
fn truncated_streams_are_refused_and_leave_nothing() {
    let src = source(100);
    let (image, _) = export(&src.data);
    let dst = store(256 * MIB);
    let admin = dst.add_client("dst", config()).unwrap();
    let data = admin.data();
    for len in (0..image.len()).step_by(331).chain([image.len() - 1]) {
        let err = data.import_image(&mut &image[..len]).unwrap_err();
        assert!(matches!(err, ImageError::Truncated), "length {len}: {err}");
        assert_empty(&dst, &admin);
    }
}

#[test]
fn other_versions_and_foreign_streams_are_refused() {
    let src = source(10);
    let (image, _) = export(&src.data);
    let dst = store(256 * MIB);
    let admin = dst.add_client("dst", config()).unwrap();
    let mut v2 = image.clone();
    v2[8] = 2;
    assert!(matches!(
        admin.data().import_image(&mut v2.as_slice()),
        Err(ImageError::Version(2))
    ));
    let mut foreign = image.clone();
    foreign[0] = b'X';
    assert!(matches!(
        admin.data().import_image(&mut foreign.as_slice()),
        Err(ImageError::BadMagic)
    ));
    assert_empty(&dst, &admin);
}

#[test]
fn imports_beyond_the_host_limit_or_the_quota_fail_whole() {
    let src = source(400);
    let before = held(&src.admin);
    let (image, _) = export(&src.data);

    // Imports `image` into a new client of `s`: the error, and the client.
    let refused = |s: &Arc<Store>, config: ClientConfig| {
        let admin = s.add_client("dst", config).unwrap();
        let err = admin
            .data()
            .import_image(&mut image.as_slice())
            .unwrap_err();
        (err, admin)
    };

    // A host limit far below the image.
    let small = store(MIB / 4);
    let (err, admin) = refused(&small, config());
    assert!(
        matches!(
            err,
            ImageError::Page {
                error: TmemError::NoSpace,
                ..
            } | ImageError::Pool {
                error: TmemError::NoSpace,
                ..
            }
        ),
        "{err}"
    );
    assert_empty(&small, &admin);

    // A persistent quota below the image.
    let dst = store(256 * MIB);
    let tight = ClientConfig {
        persistent_quota: MIB / 2,
        ..config()
    };
    let (err, admin) = refused(&dst, tight);
    assert!(err.to_string().contains("quota"), "{err}");
    assert_empty(&dst, &admin);

    // A shared pool the destination does not authorise.
    let dst = store(256 * MIB);
    let (err, admin) = refused(&dst, ClientConfig::default());
    assert!(
        matches!(
            err,
            ImageError::Pool {
                pool: 2,
                error: TmemError::NotAuthorized
            }
        ),
        "{err}"
    );
    assert_empty(&dst, &admin);

    assert_eq!(held(&src.admin), before, "the source keeps everything");
    assert_eq!(get(&src.data, h(0, 0, 2)), Some(page_of(2)));
}

#[test]
fn an_empty_client_round_trips() {
    let s = store(MIB);
    let a = s.add_client("a", ClientConfig::default()).unwrap();
    let (image, sum) = export(&a.data());
    assert_eq!((sum.pools, sum.pages), (0, 0));
    let b = s.add_client("b", ClientConfig::default()).unwrap();
    assert_eq!(b.data().import_image(&mut image.as_slice()).unwrap(), sum);
    assert_empty(&s, &b);
}
