// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Conformance of the real vtmemd to virtio 1.2 and vhost-user, as a driver
//! written from docs/protocol.md alone would exercise it: any arrangement of
//! descriptors, exact used lengths, notification suppression, and the
//! vhost-user messages a VMM may send.

mod common;

use std::time::Duration;

use common::guest::*;
use common::*;
use vtmem_guestsim::raw::request_bytes;
use vtmem_guestsim::{Op, PoolSpec, RawChainBuilder, Status, Vm, VmOptions, PAGE_SIZE};
use vtmem_protocol::{response_len, Response};

const TAG: u64 = 0xc0f0_0000_0001;

/// A chain on queue 0 with a deadline.
fn chain(vm: &Vm) -> RawChainBuilder<'_> {
    vm.raw_chain(0).timeout(Duration::from_secs(10))
}

/// Appends `bytes` as device-readable buffers cut at `cuts`.
fn readable_cut<'a>(
    mut b: RawChainBuilder<'a>,
    bytes: &[u8],
    cuts: &[usize],
) -> RawChainBuilder<'a> {
    for (x, y) in bounds(bytes.len(), cuts) {
        b = b.readable(&bytes[x..y]).expect("scratch memory");
    }
    b
}

/// Appends `len` device-writable bytes as buffers cut at `cuts`.
fn writable_cut<'a>(mut b: RawChainBuilder<'a>, len: usize, cuts: &[usize]) -> RawChainBuilder<'a> {
    for (x, y) in bounds(len, cuts) {
        b = b.writable((y - x) as u32).expect("scratch memory");
    }
    b
}

fn bounds(len: usize, cuts: &[usize]) -> Vec<(usize, usize)> {
    let starts = std::iter::once(0).chain(cuts.iter().copied());
    let ends = cuts.iter().copied().chain(std::iter::once(len));
    starts.zip(ends).collect()
}

/// The statuses of a response read from the start of `writable`.
fn statuses(writable: &[u8], num_ops: u16) -> Vec<Status> {
    let r = Response::parse(&writable[..response_len(num_ops)]).expect("a response");
    assert_eq!(r.header().status, Status::Ok, "request refused");
    assert_eq!(r.header().tag, TAG);
    (0..num_ops).map(|i| r.status(i).unwrap().status).collect()
}

/// Where a PUT's readable part (64 request bytes, a page) may be cut.
const PUT_READABLE: &[&[usize]] = &[
    &[16],                   // header 16 + operation 48, page apart
    &[16, 64],               // header, operation, page
    &[64, 64 + 2048],        // page 2048 + 2048
    &[64, 65],               // page 1 + 4095
    &[],                     // request and page in one buffer
    &[40, 64 + 4000],        // cuts inside the operation and the page
    &[0, 8, 16, 64, 64, 64], // zero-length descriptors
];

/// Where a PUT's writable part (a 32-byte response) may be cut.
const PUT_WRITABLE: &[&[usize]] = &[&[], &[16], &[8, 16, 24]];

/// Where a GET's writable part (a 32-byte response, a page) may be cut.
const GET_WRITABLE: &[&[usize]] = &[
    &[32],
    &[16, 32],
    &[32, 32 + 2048],
    &[32, 33],
    &[],
    &[20, 32 + 4095],
];

#[test]
fn any_descriptor_split_is_accepted_for_put_and_get() {
    let d = daemon(&["split"], &[]);
    let vm = connect(&d, "split");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let mut n = 0u64;
    let mut failures = Vec::new();
    for rc in PUT_READABLE {
        for wc in PUT_WRITABLE {
            n += 1;
            let hh = handle(pool, 1, n);
            let data = Box::new(random_page(n));
            let mut readable = request_bytes(
                &[Op::Put {
                    handle: hh,
                    reserved: false,
                }],
                TAG,
            );
            readable.extend_from_slice(&data[..]);
            let b = readable_cut(chain(&vm), &readable, rc);
            let out = writable_cut(b, 32, wc).submit().unwrap();
            let back: Vec<u8> = out.writable.concat();
            let what = format!("PUT readable cut at {rc:?}, writable at {wc:?}");
            if out.used_len != 32 || statuses(&back, 1) != [Status::Ok] {
                failures.push(format!("{what}: used length {}", out.used_len));
                continue;
            }
            // Read back in the usual layout: the page is the one sent.
            let got = vm.get_batch(&[hh]).unwrap();
            if got[0].0 != Status::Ok || got[0].1[..] != data[..] {
                failures.push(format!("{what}: stored page differs ({})", got[0].0));
            }
        }
    }
    // GETs of those pages, with the request and the writable part cut.
    for (i, wc) in GET_WRITABLE.iter().enumerate() {
        for rc in [&[][..], &[16][..], &[1, 17, 63][..]] {
            let k = 1 + (i as u64 % n);
            let hh = handle(pool, 1, k);
            let req = request_bytes(&[Op::Get { handle: hh }], TAG);
            let b = readable_cut(chain(&vm), &req, rc);
            let out = writable_cut(b, 32 + PAGE_SIZE, wc).submit().unwrap();
            let back: Vec<u8> = out.writable.concat();
            let what = format!("GET readable cut at {rc:?}, writable at {wc:?}");
            if out.used_len as usize != 32 + PAGE_SIZE || statuses(&back, 1) != [Status::Ok] {
                failures.push(format!("{what}: used length {}", out.used_len));
                continue;
            }
            if back[32..] != random_page(k)[..] {
                failures.push(format!("{what}: page differs"));
            }
        }
    }
    // Several operations, each in its own descriptor, pages in halves.
    let (a, b) = (handle(pool, 2, 1), handle(pool, 2, 2));
    let (pa, pb) = (random_page(100), random_page(101));
    let ops = [
        Op::Put {
            handle: a,
            reserved: false,
        },
        Op::Put {
            handle: b,
            reserved: false,
        },
        Op::Get { handle: a },
    ];
    let mut readable = request_bytes(&ops, TAG);
    readable.extend_from_slice(&pa[..]);
    readable.extend_from_slice(&pb[..]);
    let r = 16 + 3 * 48;
    let cuts = [16, 64, 112, r, r + 2048, r + 4096, r + 6144];
    let bld = readable_cut(chain(&vm), &readable, &cuts);
    let out = writable_cut(bld, 64 + PAGE_SIZE, &[16, 64, 64 + 2048])
        .submit()
        .unwrap();
    let back: Vec<u8> = out.writable.concat();
    if out.used_len as usize != 64 + PAGE_SIZE
        || statuses(&back, 3) != [Status::Ok; 3]
        || back[64..] != pa[..]
    {
        failures.push(format!(
            "three operations split apart: used length {}",
            out.used_len
        ));
    }
    assert_alive(&d);
    assert!(
        failures.is_empty(),
        "{} layouts failed:\n{}\nlog:\n{}",
        failures.len(),
        failures.join("\n"),
        d.log()
    );
}

#[test]
fn used_length_is_the_written_prefix_when_a_get_misses_before_a_hit() {
    let d = daemon(&["prefix"], &[]);
    let vm = connect(&d, "prefix");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let (miss1, hit, miss2) = (handle(pool, 3, 1), handle(pool, 3, 2), handle(pool, 3, 3));
    let data = Box::new(random_page(0x600d));
    assert_eq!(vm.put_batch(&[(hit, &*data)]).unwrap(), [Status::Ok]);

    let req = request_bytes(
        &[
            Op::Get { handle: miss1 },
            Op::Get { handle: hit },
            Op::Get { handle: miss2 },
        ],
        TAG,
    );
    let mut b = chain(&vm).readable(&req).unwrap();
    let resp = b.writable_buf(64).unwrap();
    b = b.writable_at(resp, 64);
    // Page buffers the driver filled with a marker beforehand.
    for _ in 0..3 {
        let pg = b.writable_buf(PAGE_SIZE as u32).unwrap();
        vm.ram().write(pg, &[0x5a; PAGE_SIZE]).unwrap();
        b = b.writable_at(pg, PAGE_SIZE as u32);
    }
    let out = b.submit().unwrap();
    assert_eq!(
        statuses(&out.writable[0], 3),
        [Status::Miss, Status::Ok, Status::Miss]
    );
    // Virtio 1.2 2.7.8.2: the used length counts bytes written from the
    // start of the writable part, here the response and two pages.
    assert_eq!(out.used_len as usize, 64 + 2 * PAGE_SIZE);
    let written: Vec<u8> = out.writable.concat();
    let prefix = &written[..out.used_len as usize];
    assert_eq!(
        &prefix[64..64 + PAGE_SIZE],
        &[0u8; PAGE_SIZE][..],
        "miss before the hit is zeroed"
    );
    assert_eq!(&prefix[64 + PAGE_SIZE..], &data[..]);
    assert_eq!(
        out.writable[3],
        vec![0x5a; PAGE_SIZE],
        "miss after the last hit untouched"
    );

    // A lone miss writes the response only.
    let req = request_bytes(&[Op::Get { handle: miss1 }], TAG);
    let out = chain(&vm)
        .readable(&req)
        .unwrap()
        .writable(32 + PAGE_SIZE as u32)
        .unwrap()
        .submit()
        .unwrap();
    assert_eq!(out.used_len, 32);

    // The guestsim driver checks the same rule on ordinary batches.
    let got = vm.get_batch(&[miss1, hit, miss2, hit]).unwrap();
    let st: Vec<Status> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(st, [Status::Miss, Status::Ok, Status::Miss, Status::Ok]);
    assert_eq!(got[3].1[..], data[..]);
    assert_alive(&d);
}

#[test]
fn no_interrupt_flag_is_honoured_without_event_idx() {
    let d = daemon(&["quiet"], &[]);
    // A driver that never asks for interrupts: it polls the used ring (a
    // long spin) and leaves VRING_AVAIL_F_NO_INTERRUPT set throughout.
    let quiet = connect_with(
        &d,
        "quiet",
        VmOptions {
            event_idx: false,
            spin: Duration::from_secs(20),
            ..VmOptions::default()
        },
    );
    assert!(!quiet
        .negotiated()
        .has(vtmem_guestsim::vm::VIRTIO_RING_F_EVENT_IDX));
    let pool = quiet.new_pool(PoolSpec::persistent()).unwrap();
    quiet.reset_stats();
    let data = pages(7, 4);
    for round in 0..8u64 {
        let st = quiet.put_batch(&items(pool, round, &data)).unwrap();
        assert!(st.iter().all(|s| *s == Status::Ok));
    }
    // One more request: the worker signals a batch (or not) before it takes
    // the next, so once this completes every earlier signal has been sent.
    quiet.flush_page(handle(pool, 0, 0)).unwrap();
    let s = quiet.stats();
    assert_eq!(s.sleeps, 0, "the driver waited with interrupts enabled");
    assert_eq!(
        s.interrupts, 0,
        "the device signalled {} times while the driver set NO_INTERRUPT",
        s.interrupts
    );
    // (That the device signals while the flag is clear is checked by the
    // device's unit tests and by every test whose driver sleeps.)
    assert_alive(&d);
}

#[test]
fn set_config_changes_nothing_and_keeps_the_connection() {
    use vhost::vhost_user::message::{
        VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
        VhostUserVirtioFeatures,
    };
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VringConfigData};
    use vtmem_guestsim::memory::{Allocator, GuestRam};
    use vtmem_guestsim::{Queue, QueueConfig};
    use vtmem_protocol::{DeviceConfig, CONFIG_SIZE};

    let d = daemon(&["cfg"], &[]);
    // A VMM of its own, to send what guestsim's does not.
    let mut fe = Frontend::connect(d.socket("cfg"), 1).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let acked = offered & (VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | 1 << 32);
    fe.set_features(acked).unwrap();
    let proto = fe.get_protocol_features().unwrap()
        & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK);
    fe.set_protocol_features(proto).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let read_config = |fe: &mut Frontend| {
        let (_, bytes) = fe
            .get_config(
                0,
                CONFIG_SIZE as u32,
                VhostUserConfigFlags::empty(),
                &[0u8; CONFIG_SIZE],
            )
            .unwrap();
        DeviceConfig::decode(&bytes).unwrap()
    };
    let before = read_config(&mut fe);

    // The driver writes its read-only config space: acknowledged, ignored.
    fe.set_config(0, VhostUserConfigFlags::WRITABLE, &[0xff; 4])
        .expect("SET_CONFIG answered without closing the connection");
    assert_eq!(read_config(&mut fe), before);

    // The same connection then brings a queue up and serves requests.
    let ram = std::sync::Arc::new(GuestRam::new(c"vtmem-guest-cfg", 8 << 20).unwrap());
    let mut alloc = Allocator::new(ram.base(), ram.end());
    let cfg = QueueConfig {
        indirect: false,
        timeout: Duration::from_secs(10),
        spin: Duration::ZERO,
    };
    let mut q = Queue::new(0, ram.clone(), &mut alloc, 64, 2, false, cfg).unwrap();
    fe.set_mem_table(&[ram.region_info().unwrap()]).unwrap();
    let l = q.ring().layout();
    fe.set_vring_num(0, 64).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 64,
            queue_size: 64,
            flags: 0,
            desc_table_addr: ram.host_address(l.desc).unwrap(),
            used_ring_addr: ram.host_address(l.used).unwrap(),
            avail_ring_addr: ram.host_address(l.avail).unwrap(),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_kick(0, q.kick_fd()).unwrap();
    fe.set_vring_call(0, q.call_fd()).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    assert_eq!(q.reset().unwrap(), Status::Ok);
    let pool = q.new_pool(PoolSpec::persistent()).unwrap();
    let page = Box::new(random_page(0xc0f));
    let hh = handle(pool, 1, 1);
    assert_eq!(q.put_batch(&[(hh, &*page)]).unwrap(), [Status::Ok]);
    assert_eq!(q.get_batch(&[hh]).unwrap()[0].1[..], page[..]);
    assert_alive(&d);
}

#[test]
fn a_head_outside_the_table_is_consumed_and_never_returned() {
    let d = daemon(&["heads"], &[]);
    let vm = connect(&d, "heads");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let before = vm.queue(0).ring().used_idx(vm.ram()).unwrap();
    {
        let mut q = vm.queue(0);
        q.inject_head(300).unwrap();
        q.inject_head(u16::MAX).unwrap();
    }
    // The request after them is served (its kick covers all three), and
    // the used ring gains its entry only: a used entry can only name a head
    // of the table (docs/protocol.md section 6.4).
    let data = pages(11, 1);
    assert_eq!(vm.put_batch(&items(pool, 1, &data)).unwrap(), [Status::Ok]);
    let after = vm.queue(0).ring().used_idx(vm.ram()).unwrap();
    assert_eq!(after.wrapping_sub(before), 1);
    assert_alive(&d);
}
