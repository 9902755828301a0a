// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Restarts through an orderly stop (`--state-dir`): what the VMs stored
//! comes back in the next vtmemd, pages acknowledged while a VM streamed
//! puts included; a state directory that is not one stops the start and
//! is left as it is; a recovered VM that is not declared waits for it. A
//! VMM that reconnects as QEMU does has its requests in flight answered by
//! the next vtmemd.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::guest::*;
use common::*;
use vtmem_api::Request;
use vtmem_guestsim::{Handle, PoolSpec, Status, Vm, VmOptions, PAGE_SIZE};

fn no_reset() -> VmOptions {
    VmOptions {
        reset_on_connect: false,
        ..VmOptions::default()
    }
}

/// VM `m` with 8 requests in flight, and a persistent pool to stream into.
fn streaming_vm(d: &Vtmemd) -> (Arc<Vm>, u32) {
    let vm = Arc::new(connect_with(
        d,
        "m",
        VmOptions {
            depth: 8,
            ..VmOptions::default()
        },
    ));
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    (vm, pool)
}

fn args(state: &std::path::Path, vms: &[&str]) -> Vec<String> {
    let mut a = vec!["--state-dir".to_string(), state.display().to_string()];
    for vm in vms {
        a.push("--vm".into());
        a.push((*vm).into());
    }
    a
}

#[test]
fn pages_survive_an_orderly_restart_with_a_state_dir() {
    let state = temp_dir();
    let mut d = vtmemd(&args(state.path(), &["m", "n"]));
    let vm = connect(&d, "m");
    let first_generation = vm.config().generation;
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let eph = vm.new_pool(PoolSpec::ephemeral()).unwrap();
    let data = pages(3, 300);
    let mut stored: Vec<(Handle, Box<Page>)> = Vec::new();
    for (i, p) in data.into_iter().enumerate() {
        let i = i as u64;
        let page = match i % 3 {
            0 => p,
            1 => Box::new(text_page(i)),
            _ => Box::new([0u8; PAGE_SIZE]),
        };
        stored.push((handle(pool, 2, i), page));
    }
    let batch: Vec<_> = stored.iter().map(|(h, p)| (*h, &**p)).collect();
    assert!(vm
        .put_batch(&batch)
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    assert_eq!(vm.reserve(pool, 16).unwrap(), 16);
    let cached = pages(4, 8);
    vm.put_batch(&items(eph, 1, &cached)).unwrap();
    let n = connect(&d, "n");
    let npool = n.new_pool(PoolSpec::persistent()).unwrap();
    let npages = pages(5, 40);
    n.put_batch(&items(npool, 1, &npages)).unwrap();
    let before = d.client_stats("m");

    assert!(d.stop().success(), "{}", d.log());
    // Nothing to write at a stop: the state is kept as it goes.
    assert!(state.path().join("arena").is_file());
    for f in std::fs::read_dir(state.path()).unwrap() {
        let f = f.unwrap();
        let mode = f.metadata().unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "{:?}: the state holds guest memory",
            f.path()
        );
    }
    // Its last lines reach the test through a pipe, after the exit.
    wait_until("the stop's state line", DEADLINE, || {
        d.log().contains("vm m: state kept in ")
            && d.log().contains("2 pools, 300 persistent pages")
    });
    drop((vm, n));

    d.restart(&args(state.path(), &["m", "n"])).unwrap();
    // Logged on standard error, which may reach the test after the ready
    // line on standard output.
    wait_until("the recovery is logged", DEADLINE, || {
        d.log()
            .contains("vm m: recovered 2 pools, 300 persistent pages")
    });
    let after = d.client_stats("m");
    assert_eq!(
        (
            after.persistent_pages,
            after.reserved_pages,
            after.persistent_charged,
            after.persistent_bytes,
            after.pools.len()
        ),
        (
            before.persistent_pages,
            before.reserved_pages,
            before.persistent_charged,
            before.persistent_bytes,
            before.pools.len()
        )
    );
    let status = d.status();
    assert_eq!(
        status.state_dir.as_deref(),
        Some(state.path().to_str().unwrap())
    );
    let rec = status.recovered.expect("recovery reported");
    assert_eq!((rec.vms, rec.pages), (2, 300 + 40));

    let vm = connect_with(&d, "m", no_reset());
    // The new daemon's connection names itself differently, which is how
    // the guest learns (and counts) that its back end came back.
    assert_ne!(vm.config().generation, first_generation);
    assert_ne!(vm.config().generation, 0);
    let hs: Vec<Handle> = stored.iter().map(|(h, _)| *h).collect();
    for ((h, want), (st, got)) in stored.iter().zip(vm.get_batch(&hs).unwrap()) {
        assert_eq!(st, Status::Ok, "{h:?}");
        assert!(*got == **want, "{h:?} came back different");
    }
    // The ephemeral pool is there, without its pages.
    assert_eq!(
        vm.get_batch(&[handle(eph, 1, 0)]).unwrap()[0].0,
        Status::Miss
    );
    let n = connect_with(&d, "n", no_reset());
    let got = n.get_batch(&[handle(npool, 1, 39)]).unwrap();
    assert!(got[0].0 == Status::Ok && *got[0].1 == *npages[39]);

    // vtmemctl shows it.
    let out = ctl(&d, &["status"]);
    assert!(out.stdout.contains("state directory:"), "{}", out.stdout);
    assert!(
        out.stdout.contains("340 persistent pages of 2 VM(s)"),
        "{}",
        out.stdout
    );
}

#[test]
fn puts_acknowledged_before_a_stop_are_all_there_after_it() {
    let state = temp_dir();
    let mut d = vtmemd(&args(state.path(), &["m"]));
    let (vm, pool) = streaming_vm(&d);
    let stop = Arc::new(AtomicBool::new(false));
    let streamer = {
        let (vm, stop) = (vm.clone(), stop.clone());
        std::thread::spawn(move || {
            // Batches of 64 until the daemon goes; every page of a batch
            // answered OK is acknowledged.
            let mut acked = Vec::new();
            for round in 0u64.. {
                let pg = pages(100 + round, 64);
                match vm.put_batch(&items(pool, round, &pg)) {
                    Ok(st) => {
                        for (i, s) in st.iter().enumerate() {
                            if *s == Status::Ok {
                                acked.push((handle(pool, round, i as u64), pg[i].clone()));
                            }
                        }
                    }
                    Err(_) => break,
                }
                if stop.load(Ordering::Relaxed) && round > 1_000_000 {
                    break;
                }
            }
            acked
        })
    };
    wait_until("the streamer stores pages", DEADLINE, || {
        d.client_stats("m").persistent_pages >= 64 * 20
    });
    assert!(d.stop().success(), "{}", d.log());
    stop.store(true, Ordering::Relaxed);
    let acked = streamer.join().unwrap();
    assert!(acked.len() >= 64 * 20);

    d.restart(&args(state.path(), &["m"])).unwrap();
    let again = connect_with(&d, "m", no_reset());
    for chunk in acked.chunks(128) {
        let hs: Vec<Handle> = chunk.iter().map(|(h, _)| *h).collect();
        for ((h, want), (st, got)) in chunk.iter().zip(again.get_batch(&hs).unwrap()) {
            assert_eq!(st, Status::Ok, "acknowledged page {h:?} lost");
            assert!(*got == **want, "{h:?} came back different");
        }
    }
}

#[test]
fn a_state_directory_that_is_not_one_stops_the_start_and_stays() {
    let state = temp_dir();
    // What an earlier vtmemd left there: an image, no state.
    let image = state.path().join("m.image");
    std::fs::write(&image, b"VTMEMIMG\x01\x00\x00\x00\x00\x00\x00\x00").unwrap();
    // Run to its end, so that its whole output is there to read.
    let sockets = temp_dir();
    let mut a = vec!["--socket-dir", sockets.path().to_str().unwrap()];
    let rest = args(state.path(), &["m"]);
    a.extend(rest.iter().map(String::as_str));
    let out = run_vtmemd(&a);
    assert!(
        !out.status.success(),
        "vtmemd must not serve VMs from a state directory it cannot read"
    );
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains(state.path().to_str().unwrap()) && msg.contains("not a vtmem state directory"),
        "{msg}"
    );
    assert!(
        image.is_file(),
        "the directory must stay for the administrator"
    );
}

#[test]
fn a_recovered_vm_that_is_not_declared_waits_for_it() {
    let state = temp_dir();
    let mut d = vtmemd(&args(state.path(), &["x"]));
    let vm = connect(&d, "x");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let pg = pages(9, 10);
    vm.put_batch(&items(pool, 1, &pg)).unwrap();
    drop(vm);
    d.kill();

    // Started without x: its pages wait, with a warning.
    d.restart(&args(state.path(), &["m"])).unwrap();
    wait_until("the waiting VM is reported", DEADLINE, || {
        d.log().contains("vm x: its state in") && d.log().contains("names no declared VM")
    });
    assert_eq!(d.status().recovered.expect("reported").vms, 0);
    // Adding x at run time serves what it stored.
    d.call(&Request::AddVm("x,persistent-quota=1M".parse().unwrap()));
    // vtmemd logs the recovery before it answers; the test reads its
    // output through a pipe, a little later.
    wait_until("the recovery is logged", DEADLINE, || {
        d.log()
            .contains("vm x: recovered 1 pools, 10 persistent pages")
    });
    assert_eq!(d.client_stats("x").config.persistent_quota, 1 << 20);
    let vm = connect_with(&d, "x", no_reset());
    let got = vm.get_batch(&[handle(pool, 1, 9)]).unwrap();
    assert!(got[0].0 == Status::Ok && *got[0].1 == *pg[9]);
    drop(vm);
    // Removing it frees them, for good.
    d.call(&Request::RemoveVm {
        vm: "x".parse().unwrap(),
    });
    assert!(d.stop().success(), "{}", d.log());
    d.restart(&args(state.path(), &["m", "x"])).unwrap();
    assert_eq!(d.client_stats("x").persistent_pages, 0);
}

#[test]
fn a_recovered_vm_declared_in_another_dedup_group_is_refused() {
    let state = temp_dir();
    let mut d = vtmemd(&args(state.path(), &["x"]));
    let vm = connect(&d, "x");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    vm.put_batch(&items(pool, 1, &pages(9, 4))).unwrap();
    drop(vm);
    d.kill();
    d.restart(&args(state.path(), &["m"])).unwrap();
    let err = d.raw().err(
        "add-vm",
        serde_json::json!({"name": "x", "dedup_group": "web"}),
    );
    assert!(err.contains("dedup group"), "{err}");
    // Still waiting, with its pages.
    d.call(&Request::AddVm("x".parse().unwrap()));
    assert_eq!(d.client_stats("x").persistent_pages, 4);
}

/// QEMU rewinds each ring to the used index it finds in guest memory once
/// its back end is gone (it cannot ask a closed socket), and tells the next
/// back end to start there. So when vtmemd drops a connection on purpose,
/// it must already have answered everything it will ever answer on it: a
/// batch answered afterwards would put the used index ahead of where the
/// next back end starts, and it would take chains the guest already had
/// answers for.
#[test]
fn the_used_index_is_final_when_vtmemd_drops_the_connection() {
    let state = temp_dir();
    let d = vtmemd(&args(state.path(), &["m"]));
    let (vm, pool) = streaming_vm(&d);
    let streamer = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            // Batches of 64 until the daemon goes.
            for round in 0u64.. {
                let pg = pages(300 + round % 7, 64);
                if vm.put_batch(&items(pool, round, &pg)).is_err() {
                    return round;
                }
            }
            unreachable!()
        })
    };
    wait_until("the streamer stores pages", DEADLINE, || {
        d.client_stats("m").persistent_pages >= 64 * 20
    });
    let watcher = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            let gone = vm.wait_backend_gone(DEADLINE).unwrap();
            (gone, vm.used_indexes().unwrap())
        })
    };
    assert!(d.stop().success(), "{}", d.log());
    let (gone, at_drop) = watcher.join().unwrap();
    assert!(gone, "vtmemd exited without closing the connection");
    let rounds = streamer.join().unwrap();
    assert!(rounds >= 20);
    assert_eq!(
        vm.used_indexes().unwrap(),
        at_drop,
        "vtmemd answered requests after it dropped the connection"
    );
}

/// A VMM reconnects to the next vtmemd as QEMU does with `reconnect-ms`
/// (`Vm::reconnect`: the rings start at the used index in guest memory)
/// while its guest streams puts, four requests of 128 in flight. Every
/// request is answered, by the old daemon or the new one, none twice (the
/// driver fails on an answer it did not wait for), and every page of every
/// answered request is there afterwards, byte-identical.
#[test]
fn requests_in_flight_across_an_orderly_restart_are_answered_by_the_next_vtmemd() {
    const ROUND: usize = 512;
    let state = temp_dir();
    let mut d = vtmemd(&args(state.path(), &["m"]));
    let (vm, pool) = streaming_vm(&d);
    let restarted = Arc::new(AtomicBool::new(false));
    let streamer = {
        let (vm, restarted) = (vm.clone(), restarted.clone());
        std::thread::spawn(move || {
            let mut after_restart = 0;
            let mut rounds = 0u64;
            while after_restart < 10 {
                let pg = pages(1000 + rounds, ROUND);
                let st = vm.put_batch(&items(pool, rounds, &pg)).unwrap();
                assert!(st.iter().all(|s| *s == Status::Ok), "round {rounds}");
                rounds += 1;
                if restarted.load(Ordering::Acquire) {
                    after_restart += 1;
                }
            }
            rounds
        })
    };
    wait_until("the streamer stores pages", DEADLINE, || {
        d.client_stats("m").persistent_pages >= 10 * ROUND as u64
    });
    let stopped_with = d.client_stats("m").persistent_pages;
    assert!(d.stop().success(), "{}", d.log());
    // The streamer, blocked on answers, has requests in the ring that the
    // stopped daemon never took or never answered.
    wait_until("requests wait in the ring", DEADLINE, || {
        vm.unanswered_chains().unwrap()[0] > 0
    });
    d.restart(&args(state.path(), &["m"])).unwrap();
    vm.reconnect(DEADLINE).unwrap();
    restarted.store(true, Ordering::Release);
    let rounds = streamer.join().unwrap();

    let stored = d.client_stats("m").persistent_pages;
    assert_eq!(stored, rounds * ROUND as u64);
    assert!(stored > stopped_with + 5 * ROUND as u64);
    for round in 0..rounds {
        let want = pages(1000 + round, ROUND);
        let hs: Vec<Handle> = (0..ROUND as u64).map(|i| handle(pool, round, i)).collect();
        for (i, (st, got)) in vm.get_batch(&hs).unwrap().into_iter().enumerate() {
            assert_eq!(st, Status::Ok, "round {round} page {i}");
            assert!(
                *got == *want[i],
                "round {round} page {i} came back different"
            );
        }
    }
}
