// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The driver's split rings against virtio-queue's device-side
//! implementation, in one process: layout, indirect tables, EVENT_IDX in
//! both directions, several requests in flight, and the response checks.
//! A small vtmem device model (a hash map) answers the requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use virtio_queue::{Queue as DevQueue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vtmem_guestsim::memory::{Allocator, GuestRam};
use vtmem_guestsim::{
    Error, Handle, ObjectId, Op, PageSource, PoolSpec, Queue, QueueConfig, Status,
};
use vtmem_protocol::{response_len, OpStatus, Request, ResponseHeader, ResponseWriter, PAGE_SIZE};
use vtmem_testkit::{checksum, handle, random_page};

const SIZE: u16 = 256;

#[derive(Default)]
struct Model {
    pages: HashMap<(u32, ObjectId, u64), Vec<u8>>,
    next_pool: u32,
    chains: u64,
    indirect_chains: u64,
    max_chain: usize,
}

/// Handles one chain; returns the used length.
fn serve_chain(
    mem: &GuestMemoryMmap,
    descs: &[virtio_queue::desc::split::Descriptor],
    m: &mut Model,
) -> u32 {
    m.chains += 1;
    m.max_chain = m.max_chain.max(descs.len());
    let readable: Vec<_> = descs.iter().filter(|d| !d.is_write_only()).collect();
    let writable: Vec<_> = descs.iter().filter(|d| d.is_write_only()).collect();
    // The driver puts every readable buffer before every writable one.
    let first_w = descs.iter().position(|d| d.is_write_only()).unwrap();
    assert!(descs[first_w..].iter().all(|d| d.is_write_only()));
    let mut req = vec![0u8; readable[0].len() as usize];
    mem.read_slice(&mut req, readable[0].addr()).unwrap();
    let r = Request::parse(&req).unwrap();
    let n = r.num_ops();
    let mut resp = vec![0u8; response_len(n)];
    let mut w = ResponseWriter::new(&mut resp, n).unwrap();
    let (mut pi, mut gi) = (1usize, 1usize);
    let mut written = 0u32;
    for i in 0..n {
        let st = match r.op(i).unwrap() {
            Op::NewPool(_) => {
                m.next_pool += 1;
                OpStatus {
                    status: Status::Ok,
                    value: m.next_pool as u64,
                }
            }
            Op::Put { handle, .. } => {
                let d = readable[pi];
                pi += 1;
                assert_eq!(d.len() as usize, PAGE_SIZE);
                let mut p = vec![0u8; PAGE_SIZE];
                mem.read_slice(&mut p, d.addr()).unwrap();
                m.pages
                    .insert((handle.pool, handle.object, handle.index), p);
                OpStatus::new(Status::Ok)
            }
            Op::Get { handle } => {
                let d = writable[gi];
                gi += 1;
                assert_eq!(d.len() as usize, PAGE_SIZE);
                match m.pages.get(&(handle.pool, handle.object, handle.index)) {
                    Some(p) => {
                        mem.write_slice(p, d.addr()).unwrap();
                        written += PAGE_SIZE as u32;
                        OpStatus::new(Status::Ok)
                    }
                    None => OpStatus::new(Status::Miss),
                }
            }
            Op::FlushPage { handle } => {
                m.pages.remove(&(handle.pool, handle.object, handle.index));
                OpStatus::new(Status::Ok)
            }
            _ => OpStatus::new(Status::Ok),
        };
        w.set(i, st);
    }
    assert_eq!(pi, readable.len(), "one readable page per PUT");
    assert_eq!(gi, writable.len(), "one writable page per GET");
    let len = w.finish(ResponseHeader {
        num_ops: n,
        status: Status::Ok,
        tag: r.header().tag,
    });
    mem.write_slice(&resp[..len], writable[0].addr()).unwrap();
    written + len as u32
}

struct Device {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Model>>,
}

impl Device {
    /// Serves the queue like a vhost-user backend thread: sleeps on the kick
    /// eventfd, drains with notifications disabled, re-enables, and signals
    /// the call eventfd only when `needs_notification` says so.
    fn start(ram: &GuestRam, q: &Queue, event_idx: bool, slow: Duration) -> Device {
        let mem = ram.mem().clone();
        let l = q.ring().layout();
        let kick = q.kick_fd().try_clone().unwrap();
        let call = q.call_fd().try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = thread::spawn(move || {
            let mut dq = DevQueue::new(SIZE).unwrap();
            dq.set_size(SIZE);
            dq.set_desc_table_address(Some(l.desc as u32), Some((l.desc >> 32) as u32));
            dq.set_avail_ring_address(Some(l.avail as u32), Some((l.avail >> 32) as u32));
            dq.set_used_ring_address(Some(l.used as u32), Some((l.used >> 32) as u32));
            dq.set_event_idx(event_idx);
            dq.set_ready(true);
            assert!(dq.is_valid(&mem));
            let mut m = Model::default();
            while !stop2.load(Ordering::Relaxed) {
                if !wait(&kick) {
                    continue;
                }
                loop {
                    dq.disable_notification(&mem).unwrap();
                    while let Some(chain) = dq.pop_descriptor_chain(&mem) {
                        let head = chain.head_index();
                        let raw: Vec<_> = chain.clone().collect();
                        let flags_at = GuestAddress(l.desc + 16 * head as u64 + 12);
                        let flags: u16 = mem.read_obj(flags_at).unwrap();
                        if flags & 4 != 0 {
                            m.indirect_chains += 1;
                        }
                        let len = serve_chain(&mem, &raw, &mut m);
                        thread::sleep(slow);
                        dq.add_used(&mem, head, len).unwrap();
                        if dq.needs_notification(&mem).unwrap() {
                            call.write(1).unwrap();
                        }
                    }
                    if !dq.enable_notification(&mem).unwrap() {
                        break;
                    }
                }
            }
            m
        });
        Device {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Model {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Waits up to 10 ms for a kick (the eventfd is non-blocking).
fn wait(kick: &EventFd) -> bool {
    for _ in 0..100 {
        if kick.read().is_ok() {
            return true;
        }
        thread::sleep(Duration::from_micros(100));
    }
    false
}

fn setup(event_idx: bool, indirect: bool, depth: usize) -> (Arc<GuestRam>, Queue) {
    let ram = Arc::new(GuestRam::new(c"ringtest", 16 << 20).unwrap());
    let mut alloc = Allocator::new(ram.base(), ram.end());
    let cfg = QueueConfig {
        indirect,
        timeout: Duration::from_secs(10),
        spin: Duration::ZERO,
    };
    let q = Queue::new(0, ram.clone(), &mut alloc, SIZE, depth, event_idx, cfg).unwrap();
    (ram, q)
}

fn h(i: u64) -> Handle {
    handle(1, 7, i)
}

fn roundtrip(event_idx: bool, indirect: bool) -> (Model, vtmem_guestsim::QueueStats) {
    let (ram, mut q) = setup(event_idx, indirect, 8);
    let dev = Device::start(&ram, &q, event_idx, Duration::ZERO);
    assert_eq!(q.new_pool(PoolSpec::persistent()).unwrap(), 1);
    let pages: Vec<_> = (0..300).map(|i| Box::new(random_page(i))).collect();
    let items: Vec<_> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| (h(i as u64), &**p))
        .collect();
    // 300 puts: three requests (128, 128, 44) in flight together.
    let st = q.put_batch(&items).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok));
    let handles: Vec<_> = (0..310).map(h).collect();
    let got = q.get_batch(&handles).unwrap();
    for (i, (s, p)) in got.iter().enumerate() {
        if i < 300 {
            assert_eq!(*s, Status::Ok);
            assert_eq!(checksum(p), checksum(&pages[i]), "page {i}");
        } else {
            assert_eq!(*s, Status::Miss);
        }
    }
    assert_eq!(q.flush_page(h(3)).unwrap(), Status::Ok);
    assert_eq!(q.get_batch(&[h(3)]).unwrap()[0].0, Status::Miss);
    let stats = q.stats();
    (dev.stop(), stats)
}

#[test]
fn indirect_event_idx_roundtrip() {
    let (m, _) = roundtrip(true, true);
    // Every chain went through an indirect table.
    assert_eq!(m.indirect_chains, m.chains);
}

#[test]
fn direct_chains_without_event_idx() {
    let (m, _) = roundtrip(false, false);
    assert_eq!(m.indirect_chains, 0);
    // A 128-op batch needs 130 direct descriptors.
    assert_eq!(m.max_chain, 130);
}

#[test]
fn streaming_suppresses_kicks_and_interrupts() {
    let (ram, mut q) = setup(true, true, 8);
    // A slow device stays busy while the driver queues more: EVENT_IDX
    // must suppress most kicks.
    let dev = Device::start(&ram, &q, true, Duration::from_micros(300));
    let pages: Vec<_> = (0..64).map(|i| Box::new(random_page(i))).collect();
    let reqs: Vec<_> = (0..64u64)
        .map(|r| {
            let ops: Vec<Op> = (0..32)
                .map(|i| Op::Put {
                    handle: h(r * 32 + i),
                    reserved: false,
                })
                .collect();
            let pg: Vec<_> = (0..32).map(|i| &*pages[(r as usize + i) % 64]).collect();
            (ops, PageSource::Copied(pg))
        })
        .collect();
    let mut done = 0;
    q.pipeline(reqs, 8, |c| {
        assert!(c.statuses().unwrap().iter().all(|s| *s == Status::Ok));
        done += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(done, 64);
    let s = q.stats();
    let m = dev.stop();
    assert_eq!(m.chains, 64);
    eprintln!("streaming: {s:?}");
    assert!(s.kicks * 16 <= s.ops, "{} kicks for {} ops", s.kicks, s.ops);
    assert!(s.kicks >= 1);
    // Interrupts only when the driver asked: at most one per request.
    assert!(s.interrupts <= s.requests, "{s:?}");
}

#[test]
fn no_device_times_out() {
    let (_ram, mut q) = setup(true, true, 2);
    q.set_timeout(Duration::from_millis(100));
    let e = q.execute(&[Op::Reset], &[]).unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert_eq!(q.in_flight(), 1);
}
