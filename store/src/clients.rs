// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The crash-safe state's `clients` file: each client's durable number and
//! dedup domain by name (docs/ARCHITECTURE.md, "Crash-safe state"),
//! written by a store with a state directory as clients come and go.
//!
//! ```text
//! header  "VTMEMCLI" | version u32 | 0 u32                     16 bytes
//! record  kind u8 (1 added, 2 removed, 3 group) | name length u8
//!         | 0 u16 | client u32 | domain u64 | name | xxh3-64 of the
//!         record before it
//! ```
//!
//! A group record names the dedup group whose domain `domain` is (client
//! 0, the group's name): written when the group's domain is created,
//! before the first member's addition, so that a restarted store puts
//! the group's members, old and new, in one domain.
//!
//! Records are appended one at a time (the store's client table is locked
//! for writing while one is), each complete before any journal record
//! names the client, so only the last can be torn: a last record cut
//! short or failing its check is dropped (the addition it was never
//! happened) and cut off when the file is opened. A bad record followed
//! by more bytes, or records that contradict each other, are corruption:
//! an error naming the file.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::state::{StateDir, StateError};

/// First bytes of the clients file.
pub const CLIENTS_MAGIC: [u8; 8] = *b"VTMEMCLI";
const VERSION: u32 = 1;
const HEADER: usize = 16;
const FIXED: usize = 16;
const ADDED: u8 = 1;
const REMOVED: u8 = 2;
const GROUP: u8 = 3;
/// Longest client name the durable state records, in bytes.
pub const MAX_NAME: usize = 255;

/// A client as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurableClient {
    /// Its number in journal records.
    pub client: u32,
    /// The dedup domain whose journal holds its records.
    pub domain: u64,
}

/// The clients file, open for appending.
#[derive(Debug)]
pub struct ClientsFile {
    path: PathBuf,
    file: File,
    tail: u64,
    live: BTreeMap<String, DurableClient>,
    next: u32,
    /// Dedup groups' names by domain.
    groups: BTreeMap<u64, String>,
}

fn encode(kind: u8, name: &str, c: DurableClient) -> Vec<u8> {
    let mut b = vec![kind, name.len() as u8, 0, 0];
    b.extend_from_slice(&c.client.to_le_bytes());
    b.extend_from_slice(&c.domain.to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    let check = xxh3_64(&b);
    b.extend_from_slice(&check.to_le_bytes());
    b
}

impl ClientsFile {
    /// Opens `DIR/clients`, creating it if the state is new.
    pub fn open(dir: &StateDir) -> Result<ClientsFile, StateError> {
        let path = dir.path().join("clients");
        let io = |e| StateError::Io(path.clone(), e);
        let bad = |what: String| StateError::Corrupt(path.clone(), what);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut &file, &mut bytes).map_err(io)?;
        if bytes.is_empty() {
            let mut h = CLIENTS_MAGIC.to_vec();
            h.extend_from_slice(&VERSION.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes());
            file.write_all_at(&h, 0).map_err(io)?;
            bytes = h;
        }
        if bytes.len() < HEADER || bytes[..8] != CLIENTS_MAGIC {
            return Err(bad("not a clients file (bad magic)".into()));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != VERSION {
            return Err(bad(format!(
                "version {version} is not supported (this store reads version {VERSION})"
            )));
        }
        let mut live: BTreeMap<String, DurableClient> = BTreeMap::new();
        let mut groups: BTreeMap<u64, String> = BTreeMap::new();
        let mut next = 1u32;
        let mut at = HEADER;
        while at < bytes.len() {
            let rest = &bytes[at..];
            let len = rest
                .get(1)
                .map(|&n| FIXED + usize::from(n) + 8)
                .filter(|&l| l <= rest.len());
            let rec = len.map(|l| &rest[..l]).filter(|r| {
                let n = r.len() - 8;
                r[n..] == xxh3_64(&r[..n]).to_le_bytes()
            });
            let Some(r) = rec else {
                if len.is_some_and(|l| l < rest.len()) {
                    return Err(bad(format!("record at byte {at} fails its check")));
                }
                // The last record, torn: cut it off.
                file.set_len(at as u64).map_err(io)?;
                break;
            };
            let c = DurableClient {
                client: u32::from_le_bytes([r[4], r[5], r[6], r[7]]),
                domain: u64::from_le_bytes(r[8..16].try_into().unwrap_or_default()),
            };
            let name = std::str::from_utf8(&r[FIXED..r.len() - 8])
                .map_err(|_| bad(format!("record at byte {at}: a name that is not UTF-8")))?;
            match r[0] {
                ADDED => {
                    if c.client < next || name.is_empty() {
                        return Err(bad(format!(
                            "record at byte {at}: client {} ({name:?}) added out of order",
                            c.client
                        )));
                    }
                    if live.insert(name.to_string(), c).is_some() {
                        return Err(bad(format!(
                            "record at byte {at}: client {name:?} added twice"
                        )));
                    }
                    next = c.client.checked_add(1).ok_or_else(|| {
                        bad(format!(
                            "record at byte {at}: client number {} too large",
                            c.client
                        ))
                    })?;
                }
                REMOVED => {
                    if live.get(name) != Some(&c) {
                        return Err(bad(format!(
                            "record at byte {at}: client {name:?} removed but not there"
                        )));
                    }
                    live.remove(name);
                }
                GROUP => {
                    if name.is_empty() || groups.get(&c.domain).is_some_and(|g| g.as_str() != name)
                    {
                        return Err(bad(format!(
                            "record at byte {at}: domain {} named group {name:?} again",
                            c.domain
                        )));
                    }
                    groups.insert(c.domain, name.to_string());
                }
                k => return Err(bad(format!("record at byte {at}: unknown kind {k}"))),
            }
            at += r.len();
        }
        Ok(ClientsFile {
            path,
            file,
            tail: at as u64,
            live,
            next,
            groups,
        })
    }

    /// The live clients by name.
    pub fn clients(&self) -> &BTreeMap<String, DurableClient> {
        &self.live
    }

    fn append(&mut self, b: &[u8]) -> Result<(), StateError> {
        self.file
            .write_all_at(b, self.tail)
            .map_err(|e| StateError::Io(self.path.clone(), e))?;
        self.tail += b.len() as u64;
        Ok(())
    }

    /// The number the next client added will get.
    pub fn next_number(&self) -> u32 {
        self.next
    }

    /// Records a new client `name` in `domain`; returns its number.
    pub fn add(&mut self, name: &str, domain: u64) -> Result<DurableClient, StateError> {
        let bad = |what: String| StateError::Corrupt(self.path.clone(), what);
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(bad(format!("client name of {} bytes", name.len())));
        }
        if self.live.contains_key(name) {
            return Err(bad(format!("client {name:?} is already recorded")));
        }
        let c = DurableClient {
            client: self.next,
            domain,
        };
        let next = self
            .next
            .checked_add(1)
            .ok_or_else(|| bad("every client number is used".into()))?;
        self.append(&encode(ADDED, name, c))?;
        self.next = next;
        self.live.insert(name.to_string(), c);
        Ok(c)
    }

    /// Dedup groups' names by domain.
    pub fn groups(&self) -> &BTreeMap<u64, String> {
        &self.groups
    }

    /// Records that domain `domain` is dedup group `group`'s.
    pub fn name_group(&mut self, domain: u64, group: &str) -> Result<(), StateError> {
        if group.is_empty() || group.len() > MAX_NAME {
            return Err(StateError::Corrupt(
                self.path.clone(),
                format!("group name of {} bytes", group.len()),
            ));
        }
        if self.groups.get(&domain).map(String::as_str) == Some(group) {
            return Ok(());
        }
        let c = DurableClient { client: 0, domain };
        self.append(&encode(GROUP, group, c))?;
        self.groups.insert(domain, group.to_string());
        Ok(())
    }

    /// Records that client `name` was removed.
    pub fn remove(&mut self, name: &str) -> Result<(), StateError> {
        let Some(&c) = self.live.get(name) else {
            return Err(StateError::Corrupt(
                self.path.clone(),
                format!("client {name:?} is not recorded"),
            ));
        };
        self.append(&encode(REMOVED, name, c))?;
        self.live.remove(name);
        Ok(())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, StateDir) {
        let top = tempfile::tempdir().unwrap();
        let d = StateDir::create(&top.path().join("s")).unwrap();
        (top, d)
    }

    #[test]
    fn clients_survive_reopening_and_numbers_are_never_reused() {
        let (_t, d) = setup();
        let mut f = ClientsFile::open(&d).unwrap();
        let a = f.add("web1", 1).unwrap();
        let b = f.add("web2", 7).unwrap();
        assert_eq!((a.client, b.client), (1, 2));
        f.remove("web1").unwrap();
        assert!(f
            .add("web2", 1)
            .unwrap_err()
            .to_string()
            .contains("already recorded"));
        drop(f);
        let mut f = ClientsFile::open(&d).unwrap();
        assert_eq!(f.clients().len(), 1);
        assert_eq!(f.clients()["web2"], b);
        let c = f.add("web1", 3).unwrap();
        assert_eq!(c.client, 3);
        assert!(f.add(&"x".repeat(256), 1).is_err());
    }

    #[test]
    fn groups_are_named_by_domain() {
        let (_t, d) = setup();
        let mut f = ClientsFile::open(&d).unwrap();
        f.name_group(1 << 31 | 1, "web").unwrap();
        f.add("a", 1 << 31 | 1).unwrap();
        f.name_group(1 << 31 | 1, "web").unwrap();
        drop(f);
        let f = ClientsFile::open(&d).unwrap();
        assert_eq!(f.groups()[&(1 << 31 | 1)], "web");
        assert_eq!(f.clients()["a"].domain, 1 << 31 | 1);
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_cut_off() {
        let (_t, d) = setup();
        let mut f = ClientsFile::open(&d).unwrap();
        f.add("a", 1).unwrap();
        let whole = std::fs::metadata(f.path()).unwrap().len();
        f.add("bb", 1).unwrap();
        let full = std::fs::read(f.path()).unwrap();
        drop(f);
        for cut in whole..full.len() as u64 {
            std::fs::write(d.path().join("clients"), &full[..cut as usize]).unwrap();
            let mut f = ClientsFile::open(&d).unwrap();
            assert_eq!(
                f.clients().keys().collect::<Vec<_>>(),
                ["a"],
                "cut at {cut}"
            );
            assert_eq!(std::fs::metadata(f.path()).unwrap().len(), whole);
            // Appends go on after the cut.
            assert_eq!(f.add("c", 2).unwrap().client, 2);
        }
    }

    #[test]
    fn corruption_is_an_error_naming_the_file() {
        let (_t, d) = setup();
        let mut f = ClientsFile::open(&d).unwrap();
        f.add("a", 1).unwrap();
        f.add("b", 1).unwrap();
        let p = f.path().to_path_buf();
        drop(f);
        let good = std::fs::read(&p).unwrap();
        let open = |b: &[u8]| {
            std::fs::write(&p, b).unwrap();
            ClientsFile::open(&d).unwrap_err().to_string()
        };
        let mut b = good.clone();
        b[HEADER + 5] ^= 1;
        assert_eq!(
            open(&b),
            format!("{}: record at byte 16 fails its check", p.display())
        );
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(
            open(&b),
            format!("{}: not a clients file (bad magic)", p.display())
        );
        // A record that passes its check but contradicts the others.
        let mut b = good[..HEADER].to_vec();
        b.extend(encode(
            ADDED,
            "a",
            DurableClient {
                client: 1,
                domain: 1,
            },
        ));
        b.extend(encode(
            ADDED,
            "a",
            DurableClient {
                client: 2,
                domain: 1,
            },
        ));
        assert_eq!(
            open(&b),
            format!(
                "{}: record at byte 41: client \"a\" added twice",
                p.display()
            )
        );
        let mut b = good[..HEADER].to_vec();
        b.extend(encode(
            REMOVED,
            "z",
            DurableClient {
                client: 1,
                domain: 1,
            },
        ));
        b.extend(encode(
            ADDED,
            "a",
            DurableClient {
                client: 2,
                domain: 1,
            },
        ));
        assert_eq!(
            open(&b),
            format!(
                "{}: record at byte 16: client \"z\" removed but not there",
                p.display()
            )
        );
    }
}
