// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Connection and device lifecycle: a VMM that vanishes mid-batch and
//! reconnects (pools and pages kept), a clean stop, the driver's RESET (pools
//! dropped), and VM removal through the control socket (memory freed).

mod common;

use std::time::Duration;

use common::guest::*;
use common::*;
use vtmem_api::Request;
use vtmem_guestsim::{Error, Op, PageSource, PoolSpec, Status, VmOptions};

fn no_reset() -> VmOptions {
    VmOptions {
        reset_on_connect: false,
        ..VmOptions::default()
    }
}

#[test]
fn disconnect_mid_batch_then_reconnect_keeps_pools_and_pages() {
    let d = daemon(&["m"], &[]);
    let deep = VmOptions {
        depth: 32,
        ..VmOptions::default()
    };
    let vm = connect_with(&d, "m", deep);
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let kept = pages(1, 256);
    assert!(vm
        .put_batch(&items(pool, 1, &kept))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));

    // Thirty-two 128-page batches in flight, then the VMM is gone.
    let inflight = pages(2, 32 * 128);
    {
        let mut q = vm.queue(0);
        for b in 0..32 {
            let chunk = &inflight[b * 128..(b + 1) * 128];
            let ops: Vec<Op> = (0..128)
                .map(|i| Op::Put {
                    handle: handle(pool, 2, (b * 128 + i) as u64),
                    reserved: false,
                })
                .collect();
            let pg: Vec<_> = chunk.iter().map(|p| &**p).collect();
            q.submit_with(&ops, &PageSource::Copied(pg)).unwrap();
            q.kick().unwrap();
        }
    }
    vm.disconnect();
    assert_alive(&d);

    // The VMM reconnects (no driver re-initialisation): same pool id.
    let vm = connect_with(&d, "m", no_reset());
    let hs: Vec<_> = (0..256).map(|i| handle(pool, 1, i)).collect();
    for (i, (s, p)) in vm.get_batch(&hs).unwrap().iter().enumerate() {
        assert_eq!(*s, Status::Ok, "page {i} lost across the reconnect");
        assert_eq!(checksum(p), checksum(&kept[i]));
    }
    // The interrupted batches: each page is there intact or not at all.
    let hs: Vec<_> = (0..32 * 128).map(|i| handle(pool, 2, i)).collect();
    let mut present = 0;
    for (i, (s, p)) in vm.get_batch(&hs).unwrap().iter().enumerate() {
        match s {
            Status::Ok => {
                present += 1;
                assert_eq!(checksum(p), checksum(&inflight[i]), "interrupted page {i}");
            }
            Status::Miss => {}
            other => panic!("interrupted page {i}: {other}"),
        }
    }
    eprintln!("{present} of 4096 interrupted puts had been stored");
    let c = d.client_stats("m");
    assert_eq!(Some(c.persistent_pages), Some(256 + present));
    // And the device works normally again.
    let more = pages(3, 10);
    assert!(vm
        .put_batch(&items(pool, 3, &more))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    assert_alive(&d);
}

#[test]
fn clean_stop_reports_the_ring_position_and_pages_survive() {
    let d = daemon(&["s"], &[]);
    let vm = connect(&d, "s");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(4, 20);
    for (i, p) in data.iter().enumerate() {
        let st = vm.put_batch(&[(handle(pool, 1, i as u64), &**p)]).unwrap();
        assert_eq!(st, vec![Status::Ok]);
    }
    // RESET + NEW_POOL + 20 puts = 22 chains consumed.
    let requests = vm.stats().requests;
    assert_eq!(requests, 22);
    let bases = vm.shutdown().unwrap();
    assert_eq!(bases, vec![22], "GET_VRING_BASE after the stop");
    let vm = connect_with(&d, "s", no_reset());
    let got = vm
        .get_batch(&[handle(pool, 1, 0), handle(pool, 1, 19)])
        .unwrap();
    assert!(got.iter().all(|(s, _)| *s == Status::Ok));
    assert_eq!(checksum(&got[0].1), checksum(&data[0]));
    assert_eq!(checksum(&got[1].1), checksum(&data[19]));
}

#[test]
fn reset_drops_every_pool() {
    let d = daemon(&["r"], &[]);
    let vm = connect(&d, "r");
    let pp = vm.new_pool(PoolSpec::persistent()).unwrap();
    let ep = vm.new_pool(PoolSpec::ephemeral()).unwrap();
    let data = pages(5, 64);
    assert!(vm
        .put_batch(&items(pp, 1, &data))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    assert!(vm
        .put_batch(&items(ep, 1, &data))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    assert_eq!(vm.reserve(pp, 4).unwrap(), 4);
    let base = d.status().store.host_used;

    assert_eq!(vm.reset().unwrap(), Status::Ok);
    for p in [pp, ep] {
        assert_eq!(
            vm.get_batch(&[handle(p, 1, 0)]).unwrap()[0].0,
            Status::NoPool
        );
    }
    let c = d.client_stats("r");
    assert_eq!(Some(c.persistent_pages), Some(0), "{c:?}");
    assert_eq!(Some(c.ephemeral_pages), Some(0), "{c:?}");
    assert_eq!(Some(c.reserved_pages), Some(0), "{c:?}");
    assert_eq!(c.pools.len(), 0, "{c:?}");
    assert!(d.status().store.host_used < base, "reset freed nothing");

    // Pools work again, and a driver that re-initialises (RESET at connect)
    // drops them too.
    let again = vm.new_pool(PoolSpec::persistent()).unwrap();
    assert!(vm
        .put_batch(&items(again, 1, &data[..4]))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    vm.disconnect();
    let vm = connect(&d, "r");
    assert_eq!(
        vm.get_batch(&[handle(again, 1, 0)]).unwrap()[0].0,
        Status::NoPool
    );
    wait_until("pages freed by the driver's RESET", DEADLINE, || {
        d.client_stats("r").persistent_pages == 0
    });
}

#[test]
fn removing_a_vm_frees_its_memory_and_spares_the_others() {
    let d = daemon(&["gone", "stay"], &[]);
    let base = d.status().store.host_used;
    let gone = connect(&d, "gone");
    let stay = connect(&d, "stay");
    let gp = gone.new_pool(PoolSpec::persistent()).unwrap();
    let sp = stay.new_pool(PoolSpec::persistent()).unwrap();
    let gdata = pages(6, 256);
    let sdata = pages(7, 128);
    assert!(gone
        .put_batch(&items(gp, 1, &gdata))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    assert!(stay
        .put_batch(&items(sp, 1, &sdata))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    let before = d.status().store.host_used;
    let stay_only = {
        let c = d.client_stats("stay");
        c.persistent_bytes
    };

    d.call(&Request::RemoveVm {
        vm: "gone".parse().unwrap(),
    });
    let after = d.status().store.host_used;
    assert!(
        before - after >= 256 * 4096,
        "removal freed {} bytes of at least {}",
        before - after,
        256 * 4096
    );
    assert!(
        after - base <= stay_only + 64 * 1024,
        "host_used {after} after removal"
    );
    let st = d.status();
    assert!(
        st.store.clients.iter().all(|c| c.name != "gone"),
        "removed VM still listed"
    );
    wait_until("the removed VM's socket to go", DEADLINE, || {
        !d.socket("gone").exists()
    });
    drop(gone);
    assert_alive(&d);

    // The other VM is untouched.
    let hs: Vec<_> = (0..128).map(|i| handle(sp, 1, i)).collect();
    for (i, (s, p)) in stay.get_batch(&hs).unwrap().iter().enumerate() {
        assert_eq!(*s, Status::Ok);
        assert_eq!(checksum(p), checksum(&sdata[i]));
    }

    // Added again, it is a new client: no pools.
    d.call(&Request::AddVm(
        "gone,persistent-quota=16M".parse().unwrap(),
    ));
    wait_until("the re-added VM's socket", DEADLINE, || {
        d.socket("gone").exists()
    });
    let gone = connect_with(&d, "gone", no_reset());
    assert_eq!(
        gone.get_batch(&[handle(gp, 1, 0)]).unwrap()[0].0,
        Status::NoPool
    );
    let c = d.client_stats("gone");
    assert_eq!(Some(c.persistent_pages), Some(0));
    assert_eq!(c.config.persistent_quota, 16 << 20);
    assert_alive(&d);
}

#[test]
fn a_second_vmm_on_a_busy_socket_does_not_disturb_the_first() {
    let d = daemon(&["one"], &[]);
    let first = connect(&d, "one");
    let pool = first.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(8, 32);
    assert!(first
        .put_batch(&items(pool, 1, &data))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    // A second frontend on the same socket is refused or left waiting; it
    // must not take the device from the first.
    let second = vtmem_guestsim::Vm::connect(
        d.socket("one"),
        &VmOptions {
            timeout: Duration::from_secs(1),
            ..no_reset()
        },
    );
    assert!(second.is_err(), "two VMMs on one VM socket");
    drop(second);
    let hs: Vec<_> = (0..32).map(|i| handle(pool, 1, i)).collect();
    for (i, (s, p)) in first.get_batch(&hs).unwrap().iter().enumerate() {
        assert_eq!(*s, Status::Ok);
        assert_eq!(checksum(p), checksum(&data[i]));
    }
    first.disconnect();
    let again = connect_with(&d, "one", no_reset());
    assert_eq!(again.get_batch(&hs[..1]).unwrap()[0].0, Status::Ok);
    assert_alive(&d);
}

#[test]
fn work_queued_before_the_ring_is_enabled_is_served_once_enabled() {
    let d = daemon(&["early"], &[]);
    // No REPLY_ACK, rings left disabled: a request is queued and kicked
    // before SET_VRING_ENABLE, as a VMM that does not wait might do.
    let vm = connect_with(
        &d,
        "early",
        VmOptions {
            reply_ack: false,
            defer_enable: true,
            ..VmOptions::default()
        },
    );
    let t = {
        let mut q = vm.queue(0);
        let t = q.submit(&[Op::Reset], &[]).unwrap();
        q.force_kick().unwrap();
        t
    };
    // Nothing can announce that a kick was ignored: the device gets a
    // window in which serving the disabled ring would end the wait at once.
    {
        let mut q = vm.queue(0);
        let normal = q.timeout();
        q.set_timeout(Duration::from_millis(100));
        let early = q.wait(t);
        q.set_timeout(normal);
        assert!(
            matches!(early, Err(Error::Timeout(_))),
            "a disabled ring was served: {early:?}"
        );
    }
    vm.enable_queues().unwrap();
    // No further kick: enabling must be enough.
    let c = vm.queue(0).wait(t).unwrap();
    assert_eq!(c.single().unwrap().status, Status::Ok);
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(9, 4);
    assert!(vm
        .put_batch(&items(pool, 1, &data))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
}

#[test]
fn removing_a_vm_while_it_streams_puts() {
    let d = daemon(&["busy", "calm"], &[]);
    let calm = Neighbour::start(&d, "calm");
    let vm = connect_with(
        &d,
        "busy",
        VmOptions {
            timeout: Duration::from_secs(3),
            ..VmOptions::default()
        },
    );
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(10, 128);
    let streamed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = streamed.clone();
    let streamer = std::thread::spawn(move || {
        let mut rounds = 0u64;
        loop {
            match vm.put_batch(&items(pool, rounds, &data)) {
                Ok(st) if st.iter().all(|s| *s == Status::Ok) => {
                    rounds += 1;
                    counter.store(rounds, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(st) => return (rounds, format!("refused: {:?}", st[0])),
                Err(e) => return (rounds, e.to_string()),
            }
        }
    });
    // Remove it in the middle of the stream, not before it started.
    wait_until("a few batches streamed", DEADLINE, || {
        streamed.load(std::sync::atomic::Ordering::Relaxed) >= 3
    });
    d.call(&Request::RemoveVm {
        vm: "busy".parse().unwrap(),
    });
    let (rounds, why) = streamer.join().unwrap();
    eprintln!("streamed {rounds} batches, then: {why}");
    assert!(rounds > 0);
    assert_alive(&d);
    calm.wait_rounds(2);
    calm.finish();
    let st = d.status();
    assert!(st.store.clients.iter().all(|c| c.name != "busy"));
    wait_until("memory of the removed VM freed", DEADLINE, || {
        let used = d.status().store.host_used;
        // What is left is the neighbour's (it flushes every round).
        used < 64 * 4160 + 64 * 1024
    });
}

/// A VMM that hands over guest memory it could shrink (an unsealed memfd)
/// could make the daemon fault on a truncated mapping and take every VM's
/// pages down with it. The memory table is refused instead; the daemon and
/// the other VMs carry on, and the same VM connects fine with sealed memory.
#[test]
fn unsealed_guest_memory_is_refused_and_harms_no_one() {
    let d = daemon(&["careless", "calm"], &[]);
    let calm = Neighbour::start(&d, "calm");
    calm.wait_rounds(2);
    let unsealed = VmOptions {
        unsealed_memory: true,
        timeout: Duration::from_secs(10),
        ..VmOptions::default()
    };
    let refused = vtmem_guestsim::Vm::connect(d.socket("careless"), &unsealed);
    assert!(refused.is_err(), "a VMM with unsealed memory was served");
    wait_for_log(&d, "memory table refused");
    assert_alive(&d);
    calm.wait_rounds(2);
    // The VM itself is not locked out: sealed memory is served.
    let vm = connect(&d, "careless");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let pg = pages(7, 4);
    assert!(vm
        .put_batch(&items(pool, 1, &pg))
        .unwrap()
        .iter()
        .all(|s| *s == Status::Ok));
    assert!(calm.finish() >= 4);
}

fn wait_for_log(d: &Vtmemd, needle: &str) {
    wait_until(&format!("'{needle}' in the log"), DEADLINE, || {
        d.log().contains(needle)
    });
}
