// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Non-idempotent operations of a request that a crash may have cut off
//! from its answer (docs/protocol.md section 8, "Requests offered twice"):
//! the store keeps each one's record with its request and answer (the
//! client's pending table) until told the answer is out, across crashes
//! (the store dropped without any shutdown, then recovered) and
//! checkpoints; an operation offered again is answered from it once.

#[path = "common/state_files.rs"]
mod state_files;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use state_files::journal_of;
use vtmem_store::journal::{Pending, OPCODE_NEW_POOL, OPCODE_RESERVE, OPCODE_UNRESERVE};
use vtmem_store::*;

fn config() -> StoreConfig {
    StoreConfig {
        host_limit: 64 << 20,
    }
}

fn at(position: u16, op: u8, tag: u64) -> Option<OpRef> {
    Some(OpRef {
        queue: 2,
        position,
        op,
        tag,
    })
}

struct Vm {
    _dir: tempfile::TempDir,
    path: PathBuf,
    store: Option<Arc<Store>>,
}

impl Vm {
    fn new() -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let store = Store::create(&path, config()).unwrap();
        store.add_client("vm", ClientConfig::default()).unwrap();
        Vm {
            _dir: dir,
            path,
            store: Some(store),
        }
    }

    fn data(&self) -> DataHandle {
        self.store.as_ref().unwrap().client("vm").unwrap().data()
    }

    /// Drops the store with no shutdown and recovers it.
    fn crash(&mut self) {
        let store = self.store.take().unwrap();
        assert_eq!(Arc::strong_count(&store), 1);
        drop(store);
        let (store, _) = Store::recover(&self.path, config()).unwrap();
        self.store = Some(store);
    }

    fn reserved(&self) -> u64 {
        let s = self.store.as_ref().unwrap().client("vm").unwrap().stats();
        s.reserved_pages
    }
}

fn ok(v: u64, replayed: bool) -> OnceAnswer {
    OnceAnswer {
        result: Ok(v),
        replayed,
    }
}

#[test]
fn an_operation_stays_pending_with_its_answer_until_settled() {
    let mut vm = Vm::new();
    let d = vm.data();
    let new_pool = OnceOp::NewPool(PoolSpec::persistent());
    assert_eq!(d.run_once(new_pool, at(7, 0, 70)), ok(0, false));
    assert_eq!(
        d.run_once(OnceOp::Reserve { pool: 0, pages: 9 }, at(7, 1, 70)),
        ok(9, false)
    );
    assert_eq!(
        d.run_once(OnceOp::Unreserve { pool: 0, pages: 2 }, at(8, 0, 71)),
        ok(7, false)
    );
    drop(d);
    vm.crash();
    let d = vm.data();
    let entry = |opcode, asked, value| Pending {
        tag: 0,
        opcode,
        asked,
        value,
    };
    let with_tag = |tag, p: Pending| Pending { tag, ..p };
    assert_eq!(
        d.pending_ops(),
        vec![
            ((2, 7, 0), with_tag(70, entry(OPCODE_NEW_POOL, 1, 0))),
            ((2, 7, 1), with_tag(70, entry(OPCODE_RESERVE, 0, 9))),
            ((2, 8, 0), with_tag(71, entry(OPCODE_UNRESERVE, 0, 7))),
        ]
    );
    // Offered again: answered from the records, nothing runs.
    assert_eq!(d.run_once(new_pool, at(7, 0, 70)), ok(0, true));
    assert_eq!(
        d.run_once(OnceOp::Reserve { pool: 0, pages: 9 }, at(7, 1, 70)),
        ok(9, true)
    );
    assert_eq!(vm.reserved(), 7);
    // Another opcode, pool, tag or place: another operation.
    assert_eq!(
        d.run_once(OnceOp::Unreserve { pool: 0, pages: 9 }, at(7, 1, 70)),
        ok(0, false),
        "the reservation's place, another opcode"
    );
    assert!(
        !d.run_once(OnceOp::NewPool(PoolSpec::ephemeral()), at(7, 0, 70))
            .replayed,
        "other flags"
    );
    // Settled: gone, and stays gone across a crash.
    d.settle_requests(2, &[7, 8]);
    assert!(d.pending_ops().is_empty());
    drop(d);
    vm.crash();
    assert!(vm.data().pending_ops().is_empty());
}

#[test]
fn pending_operations_survive_a_checkpoint_and_settle_after_it() {
    let mut vm = Vm::new();
    let d = vm.data();
    assert_eq!(
        d.run_once(OnceOp::NewPool(PoolSpec::persistent()), at(1, 0, 5)),
        ok(0, false)
    );
    assert_eq!(
        d.run_once(OnceOp::NewPool(PoolSpec::persistent()), at(2, 0, 6)),
        ok(1, false)
    );
    vm.store.as_ref().unwrap().checkpoint_all().unwrap();
    // After the checkpoint: one settled (in the new journal), one new.
    d.settle_requests(2, &[1]);
    assert_eq!(
        d.run_once(OnceOp::DestroyPool(0), at(3, 0, 7)),
        ok(0, false)
    );
    drop(d);
    vm.crash();
    let keys: Vec<_> = vm
        .data()
        .pending_ops()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec![(2, 2, 0), (2, 3, 0)]);
    // Recovery checkpoints too: across a second crash, the same.
    vm.crash();
    let d = vm.data();
    assert_eq!(d.run_once(OnceOp::DestroyPool(0), at(3, 0, 7)), ok(0, true));
    assert_eq!(
        d.run_once(OnceOp::NewPool(PoolSpec::persistent()), at(2, 0, 6)),
        ok(1, true)
    );
    assert_eq!(
        vm.store
            .as_ref()
            .unwrap()
            .client("vm")
            .unwrap()
            .stats()
            .pools
            .len(),
        1
    );
}

#[test]
fn a_reset_drops_every_entry_and_the_store_own_operations_have_none() {
    let mut vm = Vm::new();
    let d = vm.data();
    d.run_once(OnceOp::NewPool(PoolSpec::persistent()), at(1, 0, 5));
    // The store's own callers: no entry.
    assert_eq!(d.new_pool(PoolSpec::persistent()).unwrap(), 1);
    assert_eq!(d.reserve(1, 3).unwrap(), 3);
    assert_eq!(d.pending_ops().len(), 1);
    // A failed operation records nothing.
    assert_eq!(
        d.run_once(OnceOp::DestroyPool(9), at(4, 0, 8)).result,
        Err(TmemError::NoPool)
    );
    assert_eq!(d.pending_ops().len(), 1);
    d.run_once(OnceOp::Reset, at(5, 0, 9));
    let keys: Vec<_> = d.pending_ops().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![(2, 5, 0)]);
    d.reset();
    assert!(d.pending_ops().is_empty());
    drop(d);
    vm.crash();
    assert!(vm.data().pending_ops().is_empty());
}

#[test]
fn a_queue_start_settles_entries_outside_its_window() {
    let mut vm = Vm::new();
    let d = vm.data();
    for (position, tag) in [(65530u16, 1u64), (65535, 2), (3, 3), (300, 4)] {
        d.run_once(OnceOp::NewPool(PoolSpec::ephemeral()), at(position, 0, tag));
    }
    // Another queue's entry is not this queue's business.
    d.run_once(
        OnceOp::NewPool(PoolSpec::ephemeral()),
        Some(OpRef {
            queue: 0,
            position: 0,
            op: 0,
            tag: 0,
        }),
    );
    drop(d);
    vm.crash();
    let d = vm.data();
    // Starting at 65535 with 256 entries: 65535 and 3 may be offered
    // again; 65530 (before) and 300 (past the ring) were answered.
    assert_eq!(d.start_queue(2, 65535, 256), vec![3, 65535]);
    let keys: Vec<_> = d.pending_ops().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![(0, 0, 0), (2, 3, 0), (2, 65535, 0)]);
    drop(d);
    vm.crash();
    let keys: Vec<_> = vm
        .data()
        .pending_ops()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec![(0, 0, 0), (2, 3, 0), (2, 65535, 0)]);
}

/// The offset of the last record written in the journal at `path`.
fn last_record(path: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut place = [0u8; 64];
    let (mut last, mut at) = (0, 64);
    while f.read_exact_at(&mut place, at).is_ok() && at < 1 << 20 {
        if place.iter().any(|&b| b != 0) {
            last = at;
        }
        at += 64;
    }
    last
}

#[test]
fn a_torn_settled_record_leaves_the_entry_pending() {
    use std::os::unix::fs::FileExt;
    let mut vm = Vm::new();
    let d = vm.data();
    d.run_once(OnceOp::NewPool(PoolSpec::persistent()), at(1, 0, 5));
    d.settle_requests(2, &[1]);
    drop(d);
    let store = vm.store.take().unwrap();
    drop(store);
    // The crash came in the middle of the Settled record.
    let j = journal_of(&vm.path, 1);
    let last = last_record(&j);
    assert!(last > 64);
    let f = std::fs::OpenOptions::new().write(true).open(&j).unwrap();
    f.write_all_at(&[0u8; 16], last + 48).unwrap();
    drop(f);
    let (store, rec) = Store::recover(&vm.path, config()).unwrap();
    assert_eq!(rec.pools, 1, "the NEW_POOL record before it holds");
    vm.store = Some(store);
    // Still pending: the request is answered from it if offered again
    // (it is not: the queue starts past it, and that settles it).
    let d = vm.data();
    assert_eq!(d.pending_ops().len(), 1);
    assert_eq!(
        d.run_once(OnceOp::NewPool(PoolSpec::persistent()), at(1, 0, 5)),
        ok(0, true)
    );
    assert_eq!(d.start_queue(2, 2, 256), Vec::<u16>::new());
    assert!(d.pending_ops().is_empty());
}
