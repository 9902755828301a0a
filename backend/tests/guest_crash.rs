// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vtmemd killed with SIGKILL while several VMs stream batched puts and
//! gets: a new vtmemd on the same `--state-dir` takes over, each VMM
//! reconnects as QEMU does (`Vm::reconnect`), the requests in flight are
//! answered by the new daemon, and every persistent page any answer
//! acknowledged comes back byte-identical.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::guest::*;
use common::*;
use vtmem_guestsim::{Handle, PoolSpec, Status, Vm, VmOptions};

const VMS: [&str; 3] = ["a", "b", "c"];
/// Pages per request, requests per round.
const BATCH: usize = 32;
const ROUND: usize = 4 * BATCH;

fn args(state: &std::path::Path) -> Vec<String> {
    let mut a = vec!["--state-dir".to_string(), state.display().to_string()];
    for vm in VMS {
        a.push("--vm".into());
        a.push(vm.into());
    }
    a
}

/// What a streaming VM had acknowledged: each round's pages, by round.
type Acked = Arc<Mutex<Vec<u64>>>;

fn seed(vm: usize, round: u64) -> u64 {
    (vm as u64) << 32 | round
}

/// Streams rounds of puts (requests of `BATCH`, all in flight at once),
/// each followed by a get of an earlier round that must come back intact,
/// until `done` is set and 5 more rounds went through.
fn stream(vm: Arc<Vm>, v: usize, pool: u32, acked: Acked, done: Arc<AtomicBool>) {
    let mut after = 0;
    for round in 0u64.. {
        let pg = pages(seed(v, round), ROUND);
        let st = vm.put_batch(&items(pool, round, &pg)).unwrap();
        let refused: Vec<_> = st.iter().filter(|s| **s != Status::Ok).collect();
        assert!(
            refused.is_empty(),
            "vm {v} round {round}: {} puts refused, first {}",
            refused.len(),
            refused[0]
        );
        acked.lock().unwrap().push(round);
        let back = round / 2;
        let want = pages(seed(v, back), BATCH);
        let hs: Vec<Handle> = (0..BATCH as u64).map(|i| handle(pool, back, i)).collect();
        for (i, (st, got)) in vm.get_batch(&hs).unwrap().into_iter().enumerate() {
            assert_eq!(st, Status::Ok, "vm {v} round {back} page {i}");
            assert!(*got == *want[i], "vm {v} round {back} page {i} differs");
        }
        if done.load(Ordering::Acquire) {
            after += 1;
            if after == 5 {
                return;
            }
        }
    }
}

#[test]
fn every_acknowledged_page_survives_sigkill_while_vms_stream() {
    let state = temp_dir();
    let mut d = vtmemd(&args(state.path()));
    let done = Arc::new(AtomicBool::new(false));
    let mut vms = Vec::new();
    let mut streamers = Vec::new();
    for (v, name) in VMS.iter().enumerate() {
        let vm = Arc::new(connect_with(
            &d,
            name,
            VmOptions {
                depth: 8,
                ..VmOptions::default()
            },
        ));
        let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
        let acked: Acked = Arc::default();
        let (vm2, acked2, done2) = (vm.clone(), acked.clone(), done.clone());
        streamers.push(std::thread::spawn(move || {
            stream(vm2, v, pool, acked2, done2)
        }));
        vms.push((vm, pool, acked));
    }
    wait_until("every VM stores pages", DEADLINE, || {
        VMS.iter()
            .all(|n| d.client_stats(n).persistent_pages >= 8 * ROUND as u64)
    });
    d.kill();
    d.restart(&args(state.path())).unwrap();
    // Reported as an orderly restart's recovery is.
    assert_eq!(d.status().recovered.expect("recovery reported").vms, 3);
    for name in VMS {
        wait_until("the recovery is logged", DEADLINE, || {
            d.log().contains(&format!("vm {name}: recovered 1 pools, "))
        });
    }
    for (vm, _, _) in &vms {
        vm.reconnect(DEADLINE).unwrap();
    }
    done.store(true, Ordering::Release);
    for s in streamers {
        s.join().unwrap();
    }

    for (v, (vm, pool, acked)) in vms.iter().enumerate() {
        let rounds = acked.lock().unwrap().clone();
        assert_eq!(
            d.client_stats(VMS[v]).persistent_pages,
            (rounds.len() * ROUND) as u64
        );
        for round in rounds {
            let want = pages(seed(v, round), ROUND);
            let hs: Vec<Handle> = (0..ROUND as u64).map(|i| handle(*pool, round, i)).collect();
            for (i, (st, got)) in vm.get_batch(&hs).unwrap().into_iter().enumerate() {
                assert_eq!(st, Status::Ok, "vm {v} round {round} page {i} lost");
                assert!(*got == *want[i], "vm {v} round {round} page {i} differs");
            }
        }
    }
}

fn no_reset() -> VmOptions {
    VmOptions {
        reset_on_connect: false,
        ..VmOptions::default()
    }
}

/// Names of the journal files in `dir`: a checkpoint replaces a domain's.
fn journals(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".journal."))
        .collect();
    v.sort();
    v
}

/// What the state does while vtmemd serves, inside the seccomp sandbox
/// (enforced, the default: a call outside the allow-list kills it):
/// checkpoints (a journal past its bound is replaced by a snapshot and a
/// new journal), a VM added (its clients record) and removed (its files
/// deleted), chunks freed (punched), the checkpoint at an orderly stop;
/// then a recovery after SIGKILL finds every page.
#[test]
fn the_state_directory_is_kept_inside_the_sandbox() {
    let state = temp_dir();
    let mut d = vtmemd(&args(state.path()));
    // Logged on standard error, which reaches the test through its own
    // pipe: it may come after the ready line on standard output.
    wait_until("the sandbox is enforced", DEADLINE, || {
        d.log().contains("sandbox: enforce")
    });
    let vm = connect(&d, "a");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let before = journals(state.path());
    // 2 records a unique page: past the 16384 records of the first bound.
    const OBJECTS: u64 = 80;
    for obj in 0..OBJECTS {
        let pg = pages(obj, ROUND);
        let st = vm.put_batch(&items(pool, obj, &pg)).unwrap();
        assert!(st.iter().all(|s| *s == Status::Ok), "object {obj}");
    }
    assert_ne!(journals(state.path()), before, "no checkpoint ran");
    // Chunks emptied and freed.
    for obj in 0..OBJECTS / 2 {
        assert_eq!(
            vm.flush_object(pool, vtmem_guestsim::ObjectId([obj, 0, 0]))
                .unwrap(),
            Status::Ok
        );
    }
    d.call(&vtmem_api::Request::AddVm("z".parse().unwrap()));
    let z = connect(&d, "z");
    let zp = z.new_pool(PoolSpec::persistent()).unwrap();
    z.put_batch(&items(zp, 1, &pages(99, BATCH))).unwrap();
    drop(z);
    d.call(&vtmem_api::Request::RemoveVm {
        vm: "z".parse().unwrap(),
    });
    assert_alive(&d);
    drop(vm);
    assert!(d.stop().success(), "{}", d.log());
    d.restart(&args(state.path())).unwrap();
    let vm = connect_with(&d, "a", no_reset());
    vm.put_batch(&items(pool, 1000, &pages(1000, BATCH)))
        .unwrap();
    d.kill();
    d.restart(&args(state.path())).unwrap();
    assert_eq!(
        d.client_stats("a").persistent_pages,
        (OBJECTS / 2) * ROUND as u64 + BATCH as u64
    );
    let vm = connect_with(&d, "a", no_reset());
    for obj in (OBJECTS / 2..OBJECTS).step_by(7) {
        let want = pages(obj, ROUND);
        let hs: Vec<Handle> = (0..ROUND as u64).map(|i| handle(pool, obj, i)).collect();
        for (i, (st, got)) in vm.get_batch(&hs).unwrap().into_iter().enumerate() {
            assert_eq!(st, Status::Ok, "object {obj} page {i}");
            assert!(*got == *want[i], "object {obj} page {i} differs");
        }
    }
}

/// Rule 5 end to end: vtmemd killed five times while a VM takes its
/// pages back with exclusive gets (each get removes its page), four
/// requests in flight. A get whose answer the VM saw may leave its page
/// behind (harmless), but a get the old daemon took and never answered is
/// offered again to the next one, which must still find the page: every
/// page comes back, none is lost.
#[test]
fn exclusive_gets_in_flight_at_sigkill_lose_no_page() {
    use std::sync::atomic::AtomicU64;
    const ROUNDS: u64 = 120;
    let state = temp_dir();
    let mut d = vtmemd(&args(state.path()));
    let vm = Arc::new(connect_with(
        &d,
        "a",
        VmOptions {
            depth: 8,
            ..VmOptions::default()
        },
    ));
    let pool = vm
        .new_pool(PoolSpec {
            exclusive_gets: true,
            ..PoolSpec::persistent()
        })
        .unwrap();
    for round in 0..ROUNDS {
        let st = vm
            .put_batch(&items(pool, round, &pages(seed(0, round), ROUND)))
            .unwrap();
        assert!(st.iter().all(|s| *s == Status::Ok), "round {round}");
    }
    let done = Arc::new(AtomicU64::new(0));
    let taker = {
        let (vm, done) = (vm.clone(), done.clone());
        std::thread::spawn(move || {
            for round in 0..ROUNDS {
                let want = pages(seed(0, round), ROUND);
                let hs: Vec<Handle> = (0..ROUND as u64).map(|i| handle(pool, round, i)).collect();
                for (i, (st, got)) in vm.get_batch(&hs).unwrap().into_iter().enumerate() {
                    assert_eq!(st, Status::Ok, "round {round} page {i} lost");
                    assert!(*got == *want[i], "round {round} page {i} differs");
                }
                done.store(round + 1, Ordering::Release);
            }
        })
    };
    for at in [10, 25, 40, 55, 70] {
        wait_until("the VM takes pages back", DEADLINE, || {
            done.load(Ordering::Acquire) >= at || taker.is_finished()
        });
        assert!(
            !taker.is_finished(),
            "the gets ended before kill at round {at}"
        );
        d.kill();
        d.restart(&args(state.path())).unwrap();
        vm.reconnect(DEADLINE).unwrap();
    }
    taker.join().unwrap();
}

/// Requests offered twice (docs/protocol.md section 8), end to end: the
/// state a vtmemd leaves when it dies after running a request's
/// `NEW_POOL` and `RESERVE` and before answering it is made exactly (the
/// request's records appended to the journal of the killed daemon), so
/// that the request the VM then offers at that ring position with that
/// tag is the one the dead daemon took. The new daemon must answer it from
/// the records: the same pool id and grant, no second pool, no second
/// reservation.
#[test]
fn a_new_pool_and_a_reservation_offered_again_run_once() {
    use std::os::unix::fs::FileExt;
    use vtmem_guestsim::Op;
    use vtmem_store::journal::{Record, RECORD_BYTES};
    use vtmem_store::OpRef;

    let state = temp_dir();
    let mut d = vtmemd(&args(state.path()));
    let vm = connect(&d, "a");
    assert_eq!(vm.new_pool(PoolSpec::persistent()).unwrap(), 0);
    // Every request answered: the next one goes at the used index.
    let position = vm.used_indexes().unwrap()[0];
    assert_eq!(vm.unanswered_chains().unwrap()[0], 0);
    d.kill();

    // What the dead daemon wrote for the request before it died: "a" is
    // client 1, in domain 1.
    const TAG: u64 = 0x0ffe_4ed0;
    let at = |op| {
        Some(OpRef {
            queue: 0,
            position,
            op,
            tag: TAG,
        })
    };
    let records = [
        Record::NewPool {
            client: 1,
            pool: 1,
            flags: PoolSpec::persistent().flags(),
            uuid: None,
            op: at(0),
        },
        Record::Reserve {
            client: 1,
            pool: 1,
            total: 6,
            op: at(1),
            unreserve: false,
            answer: 6,
        },
    ];
    let journal = std::fs::read_dir(state.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("d1.journal.")
        })
        .expect("domain 1 has a journal");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&journal)
        .unwrap();
    let mut header = [0u8; RECORD_BYTES];
    f.read_exact_at(&mut header, 0).unwrap();
    let epoch = u64::from_le_bytes(header[16..24].try_into().unwrap());
    // Records are appended one after another: the tail is the first
    // place never written.
    let mut tail = RECORD_BYTES as u64;
    let mut place = [0u8; RECORD_BYTES];
    while f.read_exact_at(&mut place, tail).is_ok() && place.iter().any(|&b| b != 0) {
        tail += RECORD_BYTES as u64;
    }
    for (i, r) in records.iter().enumerate() {
        f.write_all_at(&r.encode(epoch), tail + (i * RECORD_BYTES) as u64)
            .unwrap();
    }
    drop(f);

    d.restart(&args(state.path())).unwrap();
    assert_eq!(d.client_stats("a").reserved_pages, 6);
    vm.reconnect(DEADLINE).unwrap();
    // The request, at its position, with its tag.
    let ops = [
        Op::NewPool(PoolSpec::persistent()),
        Op::Reserve { pool: 1, pages: 6 },
    ];
    let req = vtmem_guestsim::raw::request_bytes(&ops, TAG);
    let out = vm
        .raw_chain(0)
        .timeout(DEADLINE)
        .readable(&req)
        .unwrap()
        .writable(vtmem_protocol::response_len(2) as u32)
        .unwrap()
        .submit()
        .unwrap();
    let (h, st) = out.response().unwrap();
    assert_eq!(h.tag, TAG);
    let got: Vec<(Status, u64)> = st.iter().map(|s| (s.status, s.value)).collect();
    assert_eq!(got, vec![(Status::Ok, 1), (Status::Ok, 6)]);
    let s = d.client_stats("a");
    assert_eq!((s.pools.len(), s.reserved_pages), (2, 6), "ran twice");
    assert_eq!(d.show("a").device.replayed_answers, 2);
    wait_until("the answer from the records is logged", DEADLINE, || {
        d.log().contains("operation(s) answered from their records")
    });
    // Later requests run as usual.
    let st = vm.reserve(1, 2).unwrap();
    assert_eq!(st, 2);
    assert_eq!(d.client_stats("a").reserved_pages, 8);
}
