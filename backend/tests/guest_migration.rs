// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live migration between two vtmemd processes: a simulated VMM moves a
//! VM's device state (`SET_DEVICE_STATE_FD`, `CHECK_DEVICE_STATE`) from
//! one daemon to the other and back, while another VM on each daemon keeps
//! doing verified I/O; a refused import leaves nothing behind and the
//! source keeps every page.

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
