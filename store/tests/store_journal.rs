// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Model-based property test of the metadata journal (`journal.rs`) under
//! crashes: random operation sequences are written as records the way the
//! store's ordering rules say (docs/ARCHITECTURE.md, "Crash-safe state"),
//! the writer stops at a random record (a crash), that record is left
//! unwritten, torn, cut short or whole, and the journal is read back and
//! replayed. The replayed metadata must be the model's state after exactly
//! the operations whose records were all written: every acknowledged
//! operation is there, an interrupted one is fully there or fully absent,
//! and no content entry survives that no page references. Recovery then
//! checkpoints the replayed state (a snapshot naming the new journal's
//! epoch), starts a new journal, and the sequence goes on, up to three
//! crashes; each replay starts from the snapshot.
//!
//! This checks the journal and its replay, not page bytes: the store does
//! not write journals yet.

use std::collections::HashMap;
use std::path::Path;

use proptest::prelude::*;
use vtmem_store::journal::*;
use vtmem_store::snapshot::{read_snapshot, write_snapshot};
use vtmem_store::{ObjectId, Uuid};

const POOL_PERSISTENT: u8 = 1;
const POOL_SHARED: u8 = 2;

#[derive(Clone, Debug)]
struct Op {
    kind: u8,
    client: u32,
    pool: u8,
    object: u64,
    index: u64,
    x: u64,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    (0u8..10, 0u32..2, 0u8..3, 0u64..3, 0u64..6, any::<u64>()).prop_map(
        |(kind, client, pool, object, index, x)| Op {
            kind,
            client,
            pool,
            object,
            index,
            x,
        },
    )
}

/// How the record being written when the writer stopped was left.
#[derive(Clone, Debug)]
enum Tear {
    /// Never written (the file holds zeros there, preallocated).
    Unwritten,
    /// Its first `n` bytes written, the rest still zero.
    Prefix(usize),
    /// Its first `n` bytes written over garbage.
    OverGarbage(usize, Vec<u8>),
    /// The file ends `n` bytes into it.
    CutShort(usize),
    /// Written whole (the crash came before its answer).
    Whole,
}

fn tear_strategy() -> impl Strategy<Value = Tear> {
    prop_oneof![
        Just(Tear::Unwritten),
        (0usize..64).prop_map(Tear::Prefix),
        (0usize..64, proptest::collection::vec(any::<u8>(), 64))
            .prop_map(|(n, g)| Tear::OverGarbage(n, g)),
        (1usize..64).prop_map(Tear::CutShort),
        Just(Tear::Whole),
    ]
}

/// The model: tmem metadata at the level of operations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    clients: Clients,
    /// Every allocated content entry (referenced or not yet freed).
    entries: HashMap<u32, Stored>,
    /// Each client's pending table: the non-idempotent operations done
    /// for a request whose answer is not settled.
    pending: PendingTables,
    next_addr: u32,
    next_position: u16,
}

impl Model {
    fn referenced(&self) -> HashMap<u32, Stored> {
        let mut live = HashMap::new();
        for pools in self.clients.values() {
            for p in pools.values() {
                for &c in p.pages.values() {
                    if c != ZERO_CONTENT {
                        live.insert(c, self.entries[&c]);
                    }
                }
            }
        }
        live
    }

    /// Frees entries no page references (after the record that dropped
    /// the last reference: rule 3).
    fn free_unreferenced(&mut self) {
        let live = self.referenced();
        self.entries.retain(|e, _| live.contains_key(e));
    }

    fn new_entry(&self) -> u32 {
        (0..).find(|e| !self.entries.contains_key(e)).unwrap()
    }

    /// The request of an operation (none for one in five: the store's
    /// own).
    fn op_ref(&mut self, x: u64) -> Option<OpRef> {
        self.next_position = self.next_position.wrapping_add(1);
        (x % 5 != 0).then_some(OpRef {
            queue: (x % 4) as u16,
            // Sometimes the same place as before: the new entry replaces.
            position: self.next_position / 2,
            op: (x % 128) as u8,
            tag: x,
        })
    }

    fn note(&mut self, client: u32, op: Option<OpRef>, opcode: u8, asked: u8, value: u64) {
        if let Some(op) = op {
            self.pending.entry(client).or_default().insert(
                (op.queue, op.position, op.op),
                Pending {
                    tag: op.tag,
                    opcode,
                    asked,
                    value,
                },
            );
        }
    }

    fn persistent(&mut self, client: u32, pool: u8) -> Option<&mut ReplayedPool> {
        self.clients
            .get_mut(&client)?
            .get_mut(&pool)
            .filter(|p| p.flags & POOL_PERSISTENT != 0)
    }

    /// Does `op` on the model; returns the records the store writes for
    /// it, in order (none if the operation does not apply).
    fn apply(&mut self, o: &Op) -> Vec<Record> {
        let (client, pool) = (o.client, o.pool);
        let object = ObjectId([o.object, 1, 2]);
        let index = o.index;
        let exists = self
            .clients
            .get(&client)
            .is_some_and(|c| c.contains_key(&pool));
        let out = match o.kind {
            0 if !exists => {
                let flags = match o.x % 3 {
                    0 => POOL_SHARED,
                    1 => 0,
                    _ => POOL_PERSISTENT | (o.x as u8 & 4),
                };
                let uuid = (flags & POOL_SHARED != 0).then(|| Uuid::from_bytes([7; 16]).unwrap());
                let op = self.op_ref(o.x);
                self.clients.entry(client).or_default().insert(
                    pool,
                    ReplayedPool {
                        flags,
                        uuid,
                        ..Default::default()
                    },
                );
                self.note(client, op, OPCODE_NEW_POOL, flags, u64::from(pool));
                vec![Record::NewPool {
                    client,
                    pool,
                    flags,
                    uuid,
                    op,
                }]
            }
            1 if exists => {
                let op = self.op_ref(o.x);
                self.clients.get_mut(&client).unwrap().remove(&pool);
                self.note(client, op, OPCODE_DESTROY_POOL, pool, 0);
                vec![Record::DestroyPool { client, pool, op }]
            }
            2 if self.persistent(client, pool).is_some() => {
                let op = self.op_ref(o.x);
                let total = o.x % 50;
                self.persistent(client, pool).unwrap().reserved = total;
                let unreserve = o.x & 8 != 0;
                let answer = o.x % 7;
                let opcode = if unreserve {
                    OPCODE_UNRESERVE
                } else {
                    OPCODE_RESERVE
                };
                self.note(client, op, opcode, pool, answer);
                vec![Record::Reserve {
                    client,
                    pool,
                    total,
                    op,
                    unreserve: unreserve && op.is_some(),
                    answer: if op.is_some() { answer } else { 0 },
                }]
            }
            3 if o.x % 4 == 0 => {
                let op = self.op_ref(o.x);
                self.clients.entry(client).or_default().clear();
                self.pending.remove(&client);
                self.note(client, op, OPCODE_RESET, 0, 0);
                vec![Record::Reset { client, op }]
            }
            4 | 5 if self.persistent(client, pool).is_some() => {
                let live: Vec<u32> = {
                    let mut v: Vec<u32> = self.referenced().into_keys().collect();
                    v.sort_unstable();
                    v
                };
                let mut recs = Vec::new();
                let content = match o.x % 4 {
                    0 => ZERO_CONTENT,
                    1 if !live.is_empty() => live[(o.x / 4) as usize % live.len()],
                    2 => {
                        let entry = self.new_entry();
                        let pattern = (o.x / 4) | 1;
                        self.entries.insert(entry, Stored::Pattern(pattern));
                        recs.push(Record::Pattern { entry, pattern });
                        entry
                    }
                    _ => {
                        let entry = self.new_entry();
                        self.next_addr += 1;
                        let raw = o.x & 64 != 0;
                        let (len, form) = if raw {
                            (4096, Form::Raw)
                        } else {
                            (1 + (o.x >> 8) as u16 % 3584, Form::Lz4)
                        };
                        let addr = self.next_addr;
                        self.entries.insert(entry, Stored::Slot { addr, len, form });
                        recs.push(Record::Content {
                            entry,
                            addr,
                            len,
                            form,
                        });
                        entry
                    }
                };
                self.persistent(client, pool)
                    .unwrap()
                    .pages
                    .insert((object, index), content);
                recs.push(Record::Put {
                    client,
                    pool,
                    object,
                    index,
                    content,
                    reserved: false,
                });
                recs
            }
            6 if self.persistent(client, pool).is_some() => {
                self.persistent(client, pool)
                    .unwrap()
                    .pages
                    .remove(&(object, index));
                vec![Record::FlushPage {
                    client,
                    pool,
                    object,
                    index,
                }]
            }
            7 if self.persistent(client, pool).is_some() => {
                self.persistent(client, pool)
                    .unwrap()
                    .pages
                    .retain(|(ob, _), _| *ob != object);
                vec![Record::FlushObject {
                    client,
                    pool,
                    object,
                }]
            }
            8 => {
                let mut slots: Vec<u32> = self
                    .referenced()
                    .into_iter()
                    .filter(|(_, s)| matches!(s, Stored::Slot { .. }))
                    .map(|(e, _)| e)
                    .collect();
                slots.sort_unstable();
                if slots.is_empty() {
                    return Vec::new();
                }
                let entry = slots[o.x as usize % slots.len()];
                self.next_addr += 1;
                let addr = self.next_addr;
                if let Some(Stored::Slot { addr: a, .. }) = self.entries.get_mut(&entry) {
                    *a = addr;
                }
                vec![Record::Move { entry, addr }]
            }
            9 => {
                // A request's answer is in the used ring: its entries go.
                let Some(t) = self.pending.get_mut(&client) else {
                    return Vec::new();
                };
                let keys: Vec<PendingKey> = t.keys().copied().collect();
                let Some(&(queue, position, _)) = keys.get(o.x as usize % keys.len().max(1)) else {
                    return Vec::new();
                };
                t.retain(|&(q, p, _), _| (q, p) != (queue, position));
                if t.is_empty() {
                    self.pending.remove(&client);
                }
                vec![Record::Settled {
                    client,
                    queue,
                    position,
                }]
            }
            _ => Vec::new(),
        };
        self.free_unreferenced();
        out
    }

    /// What replay must give back.
    fn check(&self, r: &Replayed) -> Result<(), TestCaseError> {
        // Clients with no pool may or may not appear.
        let nonempty = |c: &Clients| -> Clients {
            c.iter()
                .filter(|(_, p)| !p.is_empty())
                .map(|(k, v)| (*k, v.clone()))
                .collect()
        };
        prop_assert_eq!(nonempty(&r.clients), nonempty(&self.clients));
        prop_assert_eq!(&r.contents, &self.referenced());
        prop_assert_eq!(&r.pending, &self.pending);
        Ok(())
    }
}

/// Writes `records` to a new journal at `path`, stopping at record
/// `stop` (left as `tear` says); returns how many were written whole.
fn write_and_crash(
    path: &Path,
    epoch: u64,
    records: &[Record],
    stop: usize,
    tear: &Tear,
) -> Result<usize, TestCaseError> {
    let w = JournalWriter::create(path, epoch, 1, records.len() as u64 + 8).unwrap();
    for r in &records[..stop.min(records.len())] {
        w.append(r).unwrap();
    }
    drop(w);
    let mut bytes = std::fs::read(path).unwrap();
    let mut whole = stop.min(records.len());
    // The rest of the file was never written (zero); the tear goes at the
    // tail.
    prop_assert!(bytes[(whole + 1) * RECORD_BYTES..].iter().all(|&b| b == 0));
    bytes.truncate((whole + 1) * RECORD_BYTES);
    if let Some(r) = records.get(stop) {
        let enc = r.encode(epoch);
        match tear {
            Tear::Unwritten => bytes.extend_from_slice(&[0; RECORD_BYTES]),
            Tear::Prefix(n) => {
                bytes.extend_from_slice(&enc[..*n]);
                bytes.resize(bytes.len() + RECORD_BYTES - n, 0);
            }
            Tear::OverGarbage(n, g) => {
                bytes.extend_from_slice(&enc[..*n]);
                bytes.extend_from_slice(&g[*n..]);
            }
            Tear::CutShort(n) => bytes.extend_from_slice(&enc[..*n]),
            Tear::Whole => {
                bytes.extend_from_slice(&enc);
                whole += 1;
            }
        }
    }
    // Preallocated room after the tail, never written.
    if !matches!(tear, Tear::CutShort(_)) {
        bytes.extend_from_slice(&[0; 2 * RECORD_BYTES]);
    }
    std::fs::write(path, &bytes).unwrap();
    Ok(whole)
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn run(segments: Vec<(Vec<Op>, usize, Tear)>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("d1.snap");
    let mut model = Model::default();
    // What the last recovery took back (nothing, the first time).
    let mut recovered = Replayed::default();
    for (gen, (ops, stop, tear)) in segments.into_iter().enumerate() {
        let epoch = 0x5eed_0000 + gen as u64;
        let path = dir.path().join(format!("d1.journal.{gen}"));
        // Recovery checkpoints what it took back, with the epoch of the
        // new journal; then the operations go on, and the crash comes
        // during them.
        write_snapshot(&snap, epoch, 1, &recovered).map_err(fail)?;
        let mut records = Vec::new();
        // After each operation: the records written so far and the model.
        let mut after = vec![(0, model.clone())];
        for o in &ops {
            records.extend(model.apply(o));
            after.push((records.len(), model.clone()));
        }
        let stop = stop % (records.len() + 1);
        let whole = write_and_crash(&path, epoch, &records, stop, &tear)?;
        // The operations whose records were all written.
        let (_, expect) = after
            .iter()
            .rev()
            .find(|(n, _)| *n <= whole)
            .expect("the state before the first operation needs no record");
        let base = read_snapshot(&snap).map_err(fail)?;
        let s = read_journal(&path).map_err(fail)?;
        prop_assert_eq!((base.epoch, s.epoch), (epoch, epoch));
        let r = replay(&path, base.state, &s.records).map_err(fail)?;
        // The pending tables too: those of the snapshot, changed by the
        // operations and settlements whose records were written.
        expect.check(&r)?;
        model = expect.clone();
        recovered = r;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn replay_after_a_crash_gives_exactly_the_written_operations(
        segments in proptest::collection::vec(
            (proptest::collection::vec(op_strategy(), 1..60), any::<usize>(), tear_strategy()),
            1..4,
        )
    ) {
        run(segments)?;
    }
}
