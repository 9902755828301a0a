// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Cross-VM deduplication: VMs in one dedup group storing the same pages use
//! the host memory of one copy; VMs in different groups (or none) do not
//! share, and sharing never leaks one VM's later changes into another's.

mod common;

use common::guest::*;
use common::*;
use vtmem_guestsim::{PoolSpec, Status, Vm};

const PAGES: usize = 512;
const COPY: u64 = (PAGES * 4096) as u64;

fn store_all(vm: &Vm, data: &[Box<[u8; 4096]>]) -> u32 {
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let st = vm.put_batch(&items(pool, 1, data)).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok), "{st:?}");
    pool
}

fn used(d: &Vtmemd) -> u64 {
    d.status().store.host_used
}

#[test]
fn one_group_stores_one_copy_other_groups_do_not_share() {
    let d = daemon(
        &[
            "web1,dedup-group=web",
            "web2,dedup-group=web",
            "db1,dedup-group=db",
            "solo",
        ],
        &["--host-limit", "64M"],
    );
    let data = pages(42, PAGES);
    let base = used(&d);

    let web1 = connect(&d, "web1");
    let p1 = store_all(&web1, &data);
    let one = used(&d) - base;
    assert!(one >= COPY, "one copy of {COPY} bytes accounted as {one}");

    // Same group: only metadata is added.
    let web2 = connect(&d, "web2");
    let p2 = store_all(&web2, &data);
    let two = used(&d) - base;
    assert!(
        two - one < COPY / 10,
        "same group: second copy cost {} bytes",
        two - one
    );

    // Other group and no group: full copies each.
    let db1 = connect(&d, "db1");
    store_all(&db1, &data);
    let three = used(&d) - base;
    assert!(
        three - two >= COPY * 9 / 10,
        "other group shared: {} bytes",
        three - two
    );
    let solo = connect(&d, "solo");
    store_all(&solo, &data);
    let four = used(&d) - base;
    assert!(
        four - three >= COPY * 9 / 10,
        "no group shared: {} bytes",
        four - three
    );

    // Sharing is invisible to the guests: web2 overwrites a page and
    // flushes another; web1 still reads its own data.
    let other = Box::new(random_page(7));
    assert_eq!(
        web2.put_batch(&[(handle(p2, 1, 0), &*other)]).unwrap(),
        vec![Status::Ok]
    );
    assert_eq!(web2.flush_page(handle(p2, 1, 1)).unwrap(), Status::Ok);
    let got = web1
        .get_batch(&[handle(p1, 1, 0), handle(p1, 1, 1)])
        .unwrap();
    assert_eq!(got[0].0, Status::Ok);
    assert_eq!(checksum(&got[0].1), checksum(&data[0]));
    assert_eq!(got[1].0, Status::Ok);
    assert_eq!(checksum(&got[1].1), checksum(&data[1]));
    let got = web2
        .get_batch(&[handle(p2, 1, 0), handle(p2, 1, 1)])
        .unwrap();
    assert_eq!(checksum(&got[0].1), checksum(&other));
    assert_eq!(got[1].0, Status::Miss);

    // Quotas are charged as if nothing were shared: both web VMs pay.
    let c1 = d.client_stats("web1");
    let c2 = d.client_stats("web2");
    assert!(c1.persistent_bytes >= COPY);
    assert!(c2.persistent_bytes >= COPY - 4096);

    // Dropping one sharer keeps the content for the other; dropping both
    // frees it.
    web2.destroy_pool(p2).unwrap();
    let after = used(&d) - base;
    assert!(
        four - after < COPY / 10,
        "destroying one sharer freed shared content"
    );
    let hs: Vec<_> = (0..PAGES as u64).map(|i| handle(p1, 1, i)).collect();
    for (i, (s, p)) in web1.get_batch(&hs).unwrap().iter().enumerate() {
        assert_eq!(*s, Status::Ok);
        assert_eq!(
            checksum(p),
            checksum(&data[i]),
            "web1 page {i} after web2 left"
        );
    }
    web1.destroy_pool(p1).unwrap();
    let last = used(&d) - base;
    assert!(
        after - last >= COPY * 9 / 10,
        "shared copy not freed: {after} -> {last}"
    );
    assert_alive(&d);
}

#[test]
fn same_content_within_one_vm_is_stored_once() {
    let d = daemon(&["v"], &[]);
    let vm = connect(&d, "v");
    let base = used(&d);
    let data = pages(9, 64);
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    // The same 64 pages under 8 objects.
    for obj in 0..8 {
        let st = vm.put_batch(&items(pool, obj, &data)).unwrap();
        assert!(st.iter().all(|s| *s == Status::Ok));
    }
    let u = used(&d) - base;
    assert!(u < 2 * 64 * 4096, "8 copies of 64 pages took {u} bytes");
    for obj in 0..8 {
        let hs: Vec<_> = (0..64).map(|i| handle(pool, obj, i)).collect();
        for (i, (s, p)) in vm.get_batch(&hs).unwrap().iter().enumerate() {
            assert_eq!(*s, Status::Ok);
            assert_eq!(checksum(p), checksum(&data[i]));
        }
    }
}
