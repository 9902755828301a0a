// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Malformed requests and chains against a real vtmemd: each case must get
//! the status docs/protocol.md section 6.4 gives it (or its chain back with
//! used length 0), must execute nothing when the request is refused, must
//! leave the daemon running and the same VM usable, while a neighbour VM
//! does verified I/O throughout.

mod common;

use std::time::Duration;

use common::guest::*;
use common::*;
use vtmem_guestsim::raw::request_bytes;
use vtmem_guestsim::ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vtmem_guestsim::{
    Op, PoolSpec, RawChainBuilder, RawDescriptor, RawOutcome, Status, Vm, VmOptions, PAGE_SIZE,
};
use vtmem_protocol::{response_len, MAX_OPS_PER_REQUEST, RESPONSE_HEADER_SIZE};

const TAG: u64 = 0x7a9_0000_beef;
const PG: u32 = PAGE_SIZE as u32;
const W: u16 = VRING_DESC_F_WRITE;

type CaseResult = Result<(), String>;

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// The request refused as a whole: used length 16, a header with `want`,
/// no statuses, the tag echoed.
fn refused(out: &RawOutcome, want: Status, tag: u64) -> CaseResult {
    let (hdr, st) = out.response().map_err(|x| format!("response: {x}"))?;
    if hdr.status != want || !st.is_empty() || hdr.num_ops != 0 {
        return Err(format!("got {hdr:?} {st:?}, want {want}"));
    }
    if hdr.tag != tag {
        return Err(format!("tag {:#x}, want {tag:#x}", hdr.tag));
    }
    if out.used_len as usize != RESPONSE_HEADER_SIZE {
        return Err(format!(
            "used length {}, want {RESPONSE_HEADER_SIZE}",
            out.used_len
        ));
    }
    Ok(())
}

/// The chain returned unused: used length 0, every writable buffer as it
/// was (zero).
fn dropped(out: &RawOutcome) -> CaseResult {
    if out.used_len != 0 {
        return Err(format!("used length {}, want 0", out.used_len));
    }
    for (i, w) in out.writable.iter().enumerate() {
        if w.iter().any(|b| *b != 0) {
            return Err(format!("writable buffer {i} was written"));
        }
    }
    Ok(())
}

/// The request accepted with these per-operation statuses.
fn executed(out: &RawOutcome, want: &[Status], extra_used: usize) -> CaseResult {
    let (hdr, st) = out.response().map_err(|x| format!("response: {x}"))?;
    let got: Vec<Status> = st.iter().map(|s| s.status).collect();
    if hdr.status != Status::Ok || got != want {
        return Err(format!("got {} {got:?}, want ok {want:?}", hdr.status));
    }
    let expect = response_len(want.len() as u16) + extra_used;
    if out.used_len as usize != expect {
        return Err(format!("used length {}, want {expect}", out.used_len));
    }
    Ok(())
}

struct Suite<'a> {
    d: &'a Vtmemd,
    vm: Vm,
    pool: u32,
    next: u64,
}

impl Suite<'_> {
    fn chain(&self) -> RawChainBuilder<'_> {
        self.vm.raw_chain(0).timeout(Duration::from_secs(10))
    }

    /// A fresh handle no case has used.
    fn fresh(&mut self) -> vtmem_guestsim::Handle {
        self.next += 1;
        handle(self.pool, 0xbad, self.next)
    }

    fn put_op(&mut self) -> (Op, vtmem_guestsim::Handle) {
        let hh = self.fresh();
        (
            Op::Put {
                handle: hh,
                reserved: false,
            },
            hh,
        )
    }

    /// The handle holds nothing (the refused request executed nothing).
    fn absent(&self, hh: vtmem_guestsim::Handle) -> CaseResult {
        let (s, _) = self.vm.get_batch(&[hh]).map_err(e)?.remove(0);
        if s != Status::Miss {
            return Err(format!("refused request stored a page ({s})"));
        }
        Ok(())
    }

    /// The same VM still gets answers.
    fn still_usable(&mut self) -> CaseResult {
        let hh = self.fresh();
        let p = Box::new(random_page(hh.index));
        let st = self
            .vm
            .put_batch(&[(hh, &*p)])
            .map_err(|x| format!("VM unusable afterwards: {x}"))?;
        if st != vec![Status::Ok] {
            return Err(format!("VM unusable afterwards: {st:?}"));
        }
        Ok(())
    }
}

fn page() -> Box<[u8; PAGE_SIZE]> {
    Box::new(random_page(0x5eed))
}

fn header_bytes(version: u16, num_ops: u16, flags: u32, tag: u64) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b[0..2].copy_from_slice(&version.to_le_bytes());
    b[2..4].copy_from_slice(&num_ops.to_le_bytes());
    b[4..8].copy_from_slice(&flags.to_le_bytes());
    b[8..16].copy_from_slice(&tag.to_le_bytes());
    b
}

type Case = (&'static str, fn(&mut Suite<'_>) -> CaseResult);

fn cases() -> Vec<Case> {
    vec![
        ("bad version", |s| {
            let (op, hh) = s.put_op();
            let mut req = request_bytes(&[op], TAG);
            req[0] = 2;
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable(&page()[..])
                .map_err(e)?
                .writable(32)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadVersion, TAG)?;
            s.absent(hh)
        }),
        ("zero operations", |s| {
            let req = header_bytes(1, 0, 0, TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .writable(16)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadRequest, TAG)
        }),
        ("too many operations", |s| {
            let n = MAX_OPS_PER_REQUEST + 1;
            let mut req = header_bytes(1, n, 0, TAG);
            let op = Op::FlushPage { handle: s.fresh() }.encode();
            for _ in 0..n {
                req.extend_from_slice(&op);
            }
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .writable(response_len(n) as u32)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadRequest, TAG)
        }),
        ("trailing bytes after the operations", |s| {
            // The readable part is one stream: 8 bytes after the operations
            // make the PUT's page 4104 bytes, not a page.
            let (op, hh) = s.put_op();
            let mut req = request_bytes(&[op], TAG);
            req.extend_from_slice(&[0u8; 8]);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable(&page()[..])
                .map_err(e)?
                .writable(32)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadChain, TAG)?;
            s.absent(hh)
        }),
        ("request shorter than its header says", |s| {
            let (op, hh) = s.put_op();
            let mut req = request_bytes(&[Op::FlushPage { handle: hh }, op], TAG);
            req.truncate(16 + 48 + 20);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .writable(48)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadRequest, TAG)?;
            s.absent(hh)
        }),
        ("reserved header flags", |s| {
            let (op, hh) = s.put_op();
            let mut req = request_bytes(&[op], TAG);
            req[4] = 1;
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable(&page()[..])
                .map_err(e)?
                .writable(32)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadRequest, TAG)?;
            s.absent(hh)
        }),
        ("no response buffer", |s| {
            let (op, hh) = s.put_op();
            let req = request_bytes(&[op], TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable(&page()[..])
                .map_err(e)?
                .submit()
                .map_err(e)?;
            dropped(&out)?;
            s.absent(hh)
        }),
        ("response buffer shorter than a header", |s| {
            let (op, hh) = s.put_op();
            let req = request_bytes(&[op], TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable(&page()[..])
                .map_err(e)?
                .writable(8)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            dropped(&out)?;
            s.absent(hh)
        }),
        ("response buffer too short for the statuses", |s| {
            let (op1, h1) = s.put_op();
            let (op2, h2) = s.put_op();
            let req = request_bytes(&[op1, op2], TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable(&page()[..])
                .map_err(e)?
                .readable(&page()[..])
                .map_err(e)?
                .writable(32)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            dropped(&out)?;
            s.absent(h1)?;
            s.absent(h2)
        }),
        ("put page missing", |s| {
            let (op1, h1) = s.put_op();
            let (op2, h2) = s.put_op();
            let req = request_bytes(&[op1, op2], TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable(&page()[..])
                .map_err(e)?
                .writable(48)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadChain, TAG)?;
            s.absent(h1)?;
            s.absent(h2)
        }),
        ("extra page buffer", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::FlushPage { handle: hh }], TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable(&page()[..])
                .map_err(e)?
                .writable(32)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadChain, TAG)
        }),
        ("get page missing", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::Get { handle: hh }, Op::Get { handle: hh }], TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .writable(48)
                .map_err(e)?
                .writable(PG)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadChain, TAG)?;
            if out.writable[1].iter().any(|b| *b != 0) {
                return Err("page buffer of a refused request written".into());
            }
            Ok(())
        }),
        ("page buffer one byte short", |s| {
            let (op, hh) = s.put_op();
            let req = request_bytes(&[op], TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable(&page()[..PAGE_SIZE - 1])
                .map_err(e)?
                .writable(32)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadChain, TAG)?;
            s.absent(hh)
        }),
        ("page buffer of two pages", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::Get { handle: hh }], TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .writable(32)
                .map_err(e)?
                .writable(2 * PG)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadChain, TAG)
        }),
        ("put page device-writable", |s| {
            let (op, hh) = s.put_op();
            let req = request_bytes(&[op], TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .writable(32)
                .map_err(e)?
                .writable(PG)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadChain, TAG)?;
            s.absent(hh)
        }),
        ("get page device-readable", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::Get { handle: hh }], TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable(&page()[..])
                .map_err(e)?
                .writable(32)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadChain, TAG)
        }),
        ("readable buffer after the response", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::Get { handle: hh }], TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .writable(32)
                .map_err(e)?
                .writable(PG)
                .map_err(e)?
                .readable(&page()[..])
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadChain, TAG)
        }),
        ("chain starts with the response", |s| {
            let out = s
                .chain()
                .writable(32)
                .map_err(e)?
                .writable(PG)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            refused(&out, Status::BadRequest, 0)
        }),
        ("put page outside guest memory", |s| {
            let (op, hh) = s.put_op();
            let req = request_bytes(&[op], TAG);
            let end = s.vm.ram().end();
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable_at(end, PG)
                .writable(32)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            dropped(&out)?;
            s.absent(hh)
        }),
        ("get page straddling the end of guest memory", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::Get { handle: hh }], TAG);
            let end = s.vm.ram().end();
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .writable(32)
                .map_err(e)?
                .writable_at(end - 2048, PG)
                .submit()
                .map_err(e)?;
            dropped(&out)
        }),
        ("request buffer below guest memory", |s| {
            let out = s
                .chain()
                .readable_at(0, 64)
                .writable(32)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            dropped(&out)
        }),
        ("response buffer at an absurd address", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::FlushPage { handle: hh }], TAG);
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .writable_at(u64::MAX - 8, 32)
                .submit()
                .map_err(e)?;
            dropped(&out)
        }),
        ("descriptor loop", |s| {
            let (op, hh) = s.put_op();
            let req = request_bytes(&[op], TAG);
            let mut b = s.chain();
            let r = b.buf(&req).map_err(e)?;
            let p = b.buf(&page()[..]).map_err(e)?;
            let w = b.writable_buf(32).map_err(e)?;
            let out = b
                .desc(RawDescriptor::new(r, req.len() as u32, 0).then(1))
                .desc(RawDescriptor::new(p, PG, 0).then(2))
                .desc(RawDescriptor::new(w, 32, W).then(0))
                .submit()
                .map_err(e)?;
            dropped(&out)?;
            s.absent(hh)
        }),
        ("next index past the table", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::FlushPage { handle: hh }], TAG);
            let mut b = s.chain();
            let r = b.buf(&req).map_err(e)?;
            let out = b
                .desc(RawDescriptor::new(r, req.len() as u32, 0).then_abs(4000))
                .submit()
                .map_err(e)?;
            dropped(&out)
        }),
        ("unknown opcode among valid operations", |s| {
            let (op1, h1) = s.put_op();
            let h3 = s.fresh();
            let mut req = request_bytes(
                &[op1, Op::FlushPage { handle: h3 }, Op::Get { handle: h1 }],
                TAG,
            );
            req[16 + 48] = 0x42;
            let p = page();
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable(&p[..])
                .map_err(e)?
                .writable(64)
                .map_err(e)?
                .writable(PG)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            executed(
                &out,
                &[Status::Ok, Status::Unsupported, Status::Ok],
                PAGE_SIZE,
            )?;
            if out.writable[1][..] != p[..] {
                return Err("the valid GET after the bad op returned other data".into());
            }
            Ok(())
        }),
        ("reserved and undefined bits in operations", |s| {
            let hh = s.fresh();
            let mut req = request_bytes(
                &[
                    Op::FlushPage { handle: hh },
                    Op::FlushPage { handle: hh },
                    Op::NewPool(PoolSpec::persistent()),
                    Op::Get { handle: hh },
                ],
                TAG,
            );
            req[16 + 2] = 1; // reserved u16 of op 0
            req[16 + 48 + 1] = 0x80; // undefined flag of op 1
            req[16 + 96 + 40] = 13; // NEW_POOL page shift 13
            req[16 + 144 + 40] = 1; // GET with a non-zero arg
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .writable(80)
                .map_err(e)?
                .writable(PG)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            executed(&out, &[Status::Invalid; 4], 0)
        }),
        ("pool ids the VM does not hold", |s| {
            let bad = handle(s.pool + 1000, 1, 1);
            let req = request_bytes(
                &[
                    Op::Put {
                        handle: bad,
                        reserved: false,
                    },
                    Op::Get { handle: bad },
                    Op::FlushObject {
                        pool: bad.pool,
                        object: bad.object,
                    },
                    Op::DestroyPool { pool: bad.pool },
                    Op::Reserve {
                        pool: bad.pool,
                        pages: 1,
                    },
                ],
                TAG,
            );
            let out = s
                .chain()
                .readable(&req)
                .map_err(e)?
                .readable(&page()[..])
                .map_err(e)?
                .writable(96)
                .map_err(e)?
                .writable(PG)
                .map_err(e)?
                .submit()
                .map_err(e)?;
            executed(&out, &[Status::NoPool; 5], 0)
        }),
        ("indirect descriptor with NEXT", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::FlushPage { handle: hh }], TAG);
            let mut b = s.chain();
            let r = b.buf(&req).map_err(e)?;
            let w = b.writable_buf(32).map_err(e)?;
            let table = [
                RawDescriptor::new(r, req.len() as u32, 0).then(1),
                RawDescriptor::new(w, 32, W),
            ];
            let tb: Vec<u8> = table.iter().flat_map(desc_bytes).collect();
            let t = b.buf(&tb).map_err(e)?;
            let w2 = b.writable_buf(32).map_err(e)?;
            let out = b
                .desc(RawDescriptor::new(t, 32, VRING_DESC_F_INDIRECT).then(1))
                .desc(RawDescriptor::new(w2, 32, W))
                .submit()
                .map_err(e)?;
            dropped(&out)
        }),
        ("indirect table inside an indirect table", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::FlushPage { handle: hh }], TAG);
            let mut b = s.chain();
            let r = b.buf(&req).map_err(e)?;
            let w = b.writable_buf(32).map_err(e)?;
            let inner = [
                RawDescriptor::new(r, req.len() as u32, 0).then(1),
                RawDescriptor::new(w, 32, W),
            ];
            let ib: Vec<u8> = inner.iter().flat_map(desc_bytes).collect();
            let it = b.buf(&ib).map_err(e)?;
            let out = b
                .indirect(&[RawDescriptor::new(it, 32, VRING_DESC_F_INDIRECT)])
                .map_err(e)?
                .submit()
                .map_err(e)?;
            dropped(&out)
        }),
        ("indirect table of 24 bytes", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::FlushPage { handle: hh }], TAG);
            let mut b = s.chain();
            let r = b.buf(&req).map_err(e)?;
            let w = b.writable_buf(32).map_err(e)?;
            let table = [
                RawDescriptor::new(r, req.len() as u32, 0).then(1),
                RawDescriptor::new(w, 32, W),
            ];
            let tb: Vec<u8> = table.iter().flat_map(desc_bytes).collect();
            let t = b.buf(&tb).map_err(e)?;
            let out = b
                .desc(RawDescriptor::new(t, 24, VRING_DESC_F_INDIRECT))
                .submit()
                .map_err(e)?;
            dropped(&out)
        }),
        ("empty indirect table", |s| {
            let mut b = s.chain();
            let t = b.buf(&[0u8; 16]).map_err(e)?;
            let out = b
                .desc(RawDescriptor::new(t, 0, VRING_DESC_F_INDIRECT))
                .submit()
                .map_err(e)?;
            dropped(&out)
        }),
        ("indirect table outside guest memory", |s| {
            let end = s.vm.ram().end();
            let out = s
                .chain()
                .desc(RawDescriptor::new(end + 4096, 64, VRING_DESC_F_INDIRECT))
                .submit()
                .map_err(e)?;
            dropped(&out)
        }),
        ("loop inside an indirect table", |s| {
            let (op, hh) = s.put_op();
            let req = request_bytes(&[op], TAG);
            let mut b = s.chain();
            let r = b.buf(&req).map_err(e)?;
            let p = b.buf(&page()[..]).map_err(e)?;
            let w = b.writable_buf(32).map_err(e)?;
            let out = b
                .indirect(&[
                    RawDescriptor::new(r, req.len() as u32, 0).then(1),
                    RawDescriptor::new(p, PG, 0).then(2),
                    RawDescriptor::new(w, 32, W).then(1),
                ])
                .map_err(e)?
                .submit()
                .map_err(e)?;
            dropped(&out)?;
            s.absent(hh)
        }),
        ("indirect chain of 200 descriptors", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::Get { handle: hh }], TAG);
            let mut b = s.chain();
            let r = b.buf(&req).map_err(e)?;
            let w = b.writable_buf(32).map_err(e)?;
            let mut table = vec![
                RawDescriptor::new(r, req.len() as u32, 0).then(1),
                RawDescriptor::new(w, 32, W).then(2),
            ];
            for i in 2..200 {
                let pg = b.alloc(PAGE_SIZE as u64).map_err(e)?;
                let d = RawDescriptor::new(pg, PG, W);
                table.push(if i + 1 < 200 { d.then(i + 1) } else { d });
            }
            let out = b.indirect(&table).map_err(e)?.submit().map_err(e)?;
            // Either refused as a chain that does not match its operation or
            // returned unused as longer than any valid request.
            if out.used_len == 0 {
                return dropped(&out);
            }
            refused(&out, Status::BadChain, TAG)
        }),
        ("NEXT flag with the chain's own head as next", |s| {
            let hh = s.fresh();
            let req = request_bytes(&[Op::FlushPage { handle: hh }], TAG);
            let mut b = s.chain();
            let r = b.buf(&req).map_err(e)?;
            let out = b
                .desc(RawDescriptor::new(r, req.len() as u32, VRING_DESC_F_NEXT).then(0))
                .submit()
                .map_err(e)?;
            dropped(&out)
        }),
    ]
}

fn desc_bytes(d: &RawDescriptor) -> [u8; 16] {
    let next = match d.next {
        vtmem_guestsim::Link::Pos(p) => p as u16,
        vtmem_guestsim::Link::Abs(a) => a,
    };
    vtmem_guestsim::ring::Descriptor {
        addr: d.addr,
        len: d.len,
        flags: d.flags,
        next,
    }
    .encode()
}

#[test]
fn malformed_requests_get_the_right_answer_and_hurt_nobody() {
    let d = daemon(&["bad", "good"], &[]);
    let neighbour = Neighbour::start(&d, "good");
    let vm = connect(&d, "bad");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let mut s = Suite {
        d: &d,
        vm,
        pool,
        next: 0,
    };
    let all = cases();
    assert!(all.len() >= 15);
    let mut failures = Vec::new();
    for (name, case) in &all {
        let r = case(&mut s).and_then(|_| s.still_usable());
        if let Err(msg) = r {
            failures.push(format!("{name}: {msg}"));
        }
        assert_alive(s.d);
        neighbour.wait_rounds(1);
    }
    let rounds = neighbour.finish();
    assert!(rounds >= all.len() as u64);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}\nlog:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n"),
        d.log()
    );
}

#[test]
fn indirect_descriptors_refused_unless_negotiated() {
    let d = daemon(&["plain"], &[]);
    let vm = connect_with(
        &d,
        "plain",
        VmOptions {
            indirect: false,
            ..VmOptions::default()
        },
    );
    assert!(!vm
        .negotiated()
        .has(vtmem_guestsim::vm::VIRTIO_RING_F_INDIRECT_DESC));
    let req = request_bytes(&[Op::Reset], TAG);
    let mut b = vm.raw_chain(0);
    let r = b.buf(&req).unwrap();
    let w = b.writable_buf(32).unwrap();
    let out = b
        .indirect(&[
            RawDescriptor::new(r, req.len() as u32, 0).then(1),
            RawDescriptor::new(w, 32, W),
        ])
        .unwrap()
        .submit()
        .unwrap();
    dropped(&out).unwrap();
    // Direct chains work, including a full 128-op batch (130 descriptors).
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    let data = pages(3, 128);
    let st = vm.put_batch(&items(pool, 1, &data)).unwrap();
    assert!(st.iter().all(|s| *s == Status::Ok));
    assert_alive(&d);
}

#[test]
fn broken_rings_hurt_only_their_own_vm() {
    let d = daemon(&["victim", "good"], &[]);
    let neighbour = Neighbour::start(&d, "good");

    // A head index past the descriptor table is skipped; the ring goes on.
    let vm = connect(&d, "victim");
    let pool = vm.new_pool(PoolSpec::persistent()).unwrap();
    {
        let mut q = vm.queue(0);
        q.inject_head(300).unwrap();
        q.inject_head(u16::MAX).unwrap();
        q.force_kick().unwrap();
    }
    let data = pages(4, 8);
    let st = vm.put_batch(&items(pool, 1, &data)).unwrap();
    assert!(
        st.iter().all(|s| *s == Status::Ok),
        "ring unusable after bad heads: {st:?}"
    );
    assert_alive(&d);
    neighbour.wait_rounds(2);

    // An available index far ahead of the ring: the device must not loop
    // or crash; this VM's ring is lost, the VMM reconnects.
    {
        let mut q = vm.queue(0);
        let bogus = q.ring().avail_idx().wrapping_add(5000);
        q.inject_avail_idx(bogus).unwrap();
        q.force_kick().unwrap();
    }
    wait_until("the device to give up the ring", DEADLINE, || {
        d.log().contains("ring unusable")
    });
    assert_alive(&d);
    neighbour.wait_rounds(2);
    vm.disconnect();
    let vm = connect_with(
        &d,
        "victim",
        VmOptions {
            reset_on_connect: false,
            ..VmOptions::default()
        },
    );
    let hs: Vec<_> = (0..8).map(|i| handle(pool, 1, i)).collect();
    let got = vm.get_batch(&hs).unwrap();
    assert!(
        got.iter().all(|(s, _)| *s == Status::Ok),
        "pages lost with the ring"
    );
    neighbour.finish();
    assert_alive(&d);
}
