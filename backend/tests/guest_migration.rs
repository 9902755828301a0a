// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live migration between two vtmemd processes: a simulated VMM moves a
//! VM's device state (`SET_DEVICE_STATE_FD`, `CHECK_DEVICE_STATE`) from
//! one daemon to the other and back, while another VM on each daemon keeps
//! doing verified I/O; a refused import leaves nothing behind and the
//! source keeps every page. While a migration logs dirty pages, every
//! guest page a GET writes is in the log.

mod common;

use common::guest::*;
use common::*;
use vtmem_guestsim::{Handle, PoolSpec, Status, Vm, VmOptions, PAGE_SIZE};

fn no_reset() -> VmOptions {
    VmOptions {
        reset_on_connect: false,
        ..VmOptions::default()
    }
}

/// What the migrating VM stored: a persistent pool (0) with incompressible,
/// text, zero and repeated pages and a reservation, an ephemeral pool (1).
struct Stored {
    pool: u32,
    pages: Vec<(Handle, Box<Page>)>,
}

fn fill(vm: &Vm) -> Stored {
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let eph = vm.new_pool(PoolSpec::ephemeral()).unwrap();
    assert_eq!((pool, eph), (0, 1));
    let mut stored = Vec::new();
    for (i, p) in pages(7, 384).into_iter().enumerate() {
        let i = i as u64;
        let page = match i % 4 {
            0 => p,
            1 => Box::new(text_page(i)),
            2 => Box::new([0u8; PAGE_SIZE]),
            _ => Box::new(text_page(99)),
        };
        stored.push((handle(pool, i / 64, i), page));
    }
    for chunk in stored.chunks(64) {
        let batch: Vec<_> = chunk.iter().map(|(h, p)| (*h, &**p)).collect();
        assert!(vm
            .put_batch(&batch)
            .unwrap()
            .iter()
            .all(|s| *s == Status::Ok));
    }
    let eph_pages = pages(8, 64);
    assert!(vm
        .put_batch(&items(eph, 1, &eph_pages))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    assert_eq!(vm.reserve(pool, 32).unwrap(), 32);
    Stored {
        pool,
        pages: stored,
    }
}

/// Every stored page comes back byte-identical; on a destination the
/// ephemeral pool is there without its pages (a get misses, it does not
/// fail).
fn verify(vm: &Vm, s: &Stored, destination: bool) {
    for chunk in s.pages.chunks(64) {
        let hs: Vec<Handle> = chunk.iter().map(|(h, _)| *h).collect();
        let got = vm.get_batch(&hs).unwrap();
        for ((h, want), (st, page)) in chunk.iter().zip(&got) {
            assert_eq!(*st, Status::Ok, "{h:?}");
            assert!(**page == **want, "{h:?} came back different");
        }
    }
    let eph = vm.get_batch(&[handle(1, 1, 0)]).unwrap();
    let want = if destination {
        Status::Miss
    } else {
        Status::Ok
    };
    assert_eq!(eph[0].0, want);
    assert_eq!(s.pool, 0);
}

/// Connects to VM `m` of `d`, fills it, stops its rings and saves its
/// device state: the VM, what it stored, its statistics, the state.
fn filled_and_saved(d: &Vtmemd) -> (Vm, Stored, vtmem_api::ClientStats, Vec<u8>) {
    let src = connect(d, "m");
    let stored = fill(&src);
    let held = d.client_stats("m");
    src.stop_rings().unwrap();
    let state = src.save_device_state().unwrap();
    (src, stored, held, state)
}

fn persistent_pages(d: &Vtmemd, vm: &str) -> u64 {
    d.client_stats(vm).persistent_pages
}

#[test]
fn device_state_moves_a_vm_between_two_daemons_and_back_while_neighbours_run() {
    let a = daemon(&["m", "na"], &[]);
    let b = daemon(&["m", "nb"], &[]);
    let na = Neighbour::start(&a, "na");
    let nb = Neighbour::start(&b, "nb");

    // A to B: stop, save, load on a fresh connection to B.
    let (src, stored, held, state) = filled_and_saved(&a);
    let dst = connect_with(&b, "m", no_reset());
    dst.load_device_state(&state).unwrap();
    verify(&dst, &stored, true);
    let moved = b.client_stats("m");
    assert_eq!(
        (
            moved.persistent_pages,
            moved.reserved_pages,
            moved.persistent_charged
        ),
        (
            held.persistent_pages,
            held.reserved_pages,
            held.persistent_charged
        )
    );
    assert_eq!(b.show("m").device.state_imports, 1);
    // The source frees the VM's pages once its VMM goes (QEMU quits after
    // a successful migration); until then it keeps them.
    assert_eq!(persistent_pages(&a, "m"), held.persistent_pages);
    src.disconnect();
    wait_until("the source frees the migrated VM", DEADLINE, || {
        persistent_pages(&a, "m") == 0 && a.client_stats("m").pools.is_empty()
    });
    assert_eq!(a.show("m").device.state_exports, 1);
    na.wait_rounds(2);
    nb.wait_rounds(2);

    // And back: B to A.
    dst.stop_rings().unwrap();
    let state = dst.save_device_state().unwrap();
    let back = connect_with(&a, "m", no_reset());
    back.load_device_state(&state).unwrap();
    verify(&back, &stored, true);
    dst.disconnect();
    wait_until("B frees the migrated VM", DEADLINE, || {
        persistent_pages(&b, "m") == 0
    });
    assert!(na.finish() >= 2 && nb.finish() >= 2);
    assert_alive(&a);
    assert_alive(&b);
}

#[test]
fn a_refused_import_leaves_nothing_and_the_source_keeps_every_page() {
    let a = daemon(&["m"], &[]);
    // Room for the neighbour-free VM's structures, not for its pages.
    let b = daemon(&["m"], &["--host-limit", "256K"]);
    let (src, stored, held, state) = filled_and_saved(&a);

    let dst = connect_with(&b, "m", no_reset());
    let err = dst.load_device_state(&state).unwrap_err();
    assert!(err.to_string().contains("CHECK_DEVICE_STATE"), "{err}");
    wait_until("vtmemd logs why the import failed", DEADLINE, || {
        b.log().contains("device state not taken: cannot take")
    });
    let left = b.client_stats("m");
    assert_eq!(
        (left.persistent_pages, left.reserved_pages, left.pools.len()),
        (0, 0, 0)
    );
    assert_eq!(b.status().store.host_used, 0);
    assert_eq!(b.show("m").device.state_failures, 1);

    // A corrupt or truncated stream is refused the same way.
    let mut bad = state.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    assert!(dst.load_device_state(&bad).is_err());
    assert!(dst.load_device_state(&state[..state.len() - 9]).is_err());
    assert!(dst.load_device_state(&[]).is_err());
    assert_eq!(b.client_stats("m").pools.len(), 0);
    dst.disconnect();

    // The source runs the VM again (QEMU starts the device after a failed
    // migration); its VMM leaving later frees nothing.
    src.set_features_again().unwrap();
    src.disconnect();
    let again = connect_with(&a, "m", no_reset());
    verify(&again, &stored, false);
    assert_eq!(a.client_stats("m").persistent_pages, held.persistent_pages);
    assert_alive(&a);
    assert_alive(&b);
}

/// While QEMU migrates, the device marks in the dirty log every guest page
/// a GET writes: a page decompressed straight into guest memory (one
/// contiguous buffer), one written through a bounce page (a buffer split
/// across two guest pages), and a miss's buffer zeroed because a later get
/// of the request hit. A miss after the last hit writes nothing and marks
/// nothing. A page the log misses would reach the destination stale.
#[test]
fn gets_mark_every_guest_page_they_write_in_the_dirty_log() {
    use vtmem_guestsim::raw::{request_bytes, response_bytes};
    use vtmem_guestsim::{Op, PageSource};

    let d = daemon(&["dirty"], &[]);
    let vm = connect_with(
        &d,
        "dirty",
        VmOptions {
            guest_pages: 16,
            ..VmOptions::default()
        },
    );
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let data: Vec<Box<Page>> = (0..10u64)
        .map(|i| match i % 2 {
            0 => Box::new(text_page(i)),
            _ => Box::new(random_page(i)),
        })
        .collect();
    assert!(vm
        .put_batch(&items(pool, 1, &data))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    let gp = vm.guest_pages();
    let marker = [0x5a; PAGE_SIZE];
    for i in 0..16 {
        vm.write_guest_page(i, &marker).unwrap();
    }
    let log = vm.start_dirty_log().unwrap();
    let absent = handle(pool, 1, 999);

    // In place: a miss before the hits (zeroed), 8 hits, a miss at the end.
    let mut ops = vec![Op::Get { handle: absent }];
    ops.extend((0..8).map(|i| Op::Get {
        handle: handle(pool, 1, i),
    }));
    ops.push(Op::Get { handle: absent });
    let addrs: Vec<u64> = (0..10).map(|i| gp.addr(i)).collect();
    let c = vm
        .queue(0)
        .execute_with(&ops, &PageSource::InGuest(addrs))
        .unwrap();
    let st = c.statuses().unwrap();
    assert_eq!(st[0], Status::Miss);
    assert!(st[1..9].iter().all(|s| *s == Status::Ok), "{st:?}");
    assert_eq!(st[9], Status::Miss);
    for i in 1..9u64 {
        assert!(
            *vm.read_guest_page(i).unwrap() == *data[i as usize - 1],
            "guest page {i}"
        );
        assert!(
            log.is_dirty(gp.addr(i)).unwrap(),
            "guest page {i} not logged"
        );
    }
    assert!(
        *vm.read_guest_page(0).unwrap() == [0u8; PAGE_SIZE],
        "miss before a hit is zeroed"
    );
    assert!(log.is_dirty(gp.addr(0)).unwrap(), "zeroed page not logged");
    assert!(
        *vm.read_guest_page(9).unwrap() == marker,
        "last miss untouched"
    );
    assert!(!log.is_dirty(gp.addr(9)).unwrap(), "untouched page logged");
    assert!(!log.is_dirty(gp.addr(15)).unwrap(), "unused page logged");

    // Through a bounce page: the buffer is the second half of guest page 12
    // and the first half of guest page 13.
    log.clear().unwrap();
    let half = PAGE_SIZE as u32 / 2;
    let req = request_bytes(
        &[Op::Get {
            handle: handle(pool, 1, 9),
        }],
        0x1065,
    );
    let out = vm
        .raw_chain(0)
        .readable(&req)
        .unwrap()
        .writable(response_bytes(1))
        .unwrap()
        .writable_at(gp.addr(12) + u64::from(half), half)
        .writable_at(gp.addr(13), half)
        .submit()
        .unwrap();
    let (header, st) = out.response().unwrap();
    assert_eq!(header.status, Status::Ok, "{header:?}\n{}", d.log());
    assert_eq!(st[0].status, Status::Ok);
    let (p12, p13) = (
        vm.read_guest_page(12).unwrap(),
        vm.read_guest_page(13).unwrap(),
    );
    let h = PAGE_SIZE / 2;
    assert!(p12[h..] == data[9][..h] && p13[..h] == data[9][h..]);
    assert!(log.is_dirty(gp.addr(12)).unwrap(), "first half not logged");
    assert!(log.is_dirty(gp.addr(13)).unwrap(), "second half not logged");
    assert!(!log.is_dirty(gp.addr(1)).unwrap(), "cleared bit came back");
}
