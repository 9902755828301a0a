// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A state directory on a file system that fills up: puts are refused
//! with `NoSpace`, the process lives (a write through a mapping to a place
//! a full tmpfs cannot back would kill it with SIGBUS), every page that
//! was accepted reads back, a crash while it is full is recovered (at
//! once, or once there is room for the checkpoint recovery writes), puts
//! are accepted again once flushes free room, and a recovery finds every
//! accepted page.
//!
//! The test runs itself again (this test binary) in a user and mount
//! namespace of its own (`unshare -rm`), with a 4 MiB tmpfs mounted over
//! a temporary directory: no privilege is needed, and nothing outside
//! the child sees the mount.

use std::path::Path;
use std::process::Command;

use vtmem_store::*;
use vtmem_testkit::{handle, random_page};

const CHILD: &str = "VTMEM_FULL_FS_CHILD";
const TEST: &str = "puts_on_a_full_file_system_are_refused_and_lose_nothing";

fn config() -> StoreConfig {
    StoreConfig {
        host_limit: 256 << 20,
    }
}

#[test]
fn puts_on_a_full_file_system_are_refused_and_lose_nothing() {
    if let Some(dir) = std::env::var_os(CHILD) {
        child(Path::new(&dir));
        return;
    }
    let top = tempfile::tempdir().unwrap();
    let mount = top.path().join("small");
    std::fs::create_dir(&mount).unwrap();
    // Without user namespaces (some hardened hosts) there is no way to
    // make a small file system unprivileged: say so loudly.
    let probe = Command::new("unshare").args(["-rm", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: `unshare -rm` is not available here");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=4m vtmem-test "$1" && exec "$2" --exact "$3" --nocapture"#)
        .args([
            "sh".as_ref(),
            mount.as_os_str(),
            exe.as_os_str(),
            TEST.as_ref(),
        ])
        .env(CHILD, mount.join("state"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "the child failed ({}):\n{text}",
        out.status
    );
    // The child's own checks ran (not a mount that failed quietly).
    assert!(text.contains("CHILD DONE"), "{text}");
}

fn child(dir: &Path) {
    // Room an administrator can make later.
    let ballast = dir.with_file_name("ballast");
    std::fs::write(&ballast, vec![1u8; 512 << 10]).unwrap();
    let store = Store::create(dir, config()).unwrap();
    let c = store
        .add_client("vm", ClientConfig::default())
        .unwrap()
        .data();
    let pool = c.new_pool(PoolSpec::persistent()).unwrap();
    // Random pages (stored raw): 16 fill an extent of the arena.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..4096u64 {
        match c.put(&handle(pool, 1, i), &random_page(i), false) {
            Ok(()) => accepted.push(i),
            Err(TmemError::NoSpace) => refused += 1,
            Err(e) => panic!("put {i}: {e}"),
        }
    }
    println!("accepted {}, refused {refused}", accepted.len());
    assert!(accepted.len() >= 64, "too few accepted: {}", accepted.len());
    assert!(refused > 0, "a 4 MiB file system never filled");
    let mut out = [0u8; PAGE_SIZE];
    for &i in &accepted {
        assert!(c.get(&handle(pool, 1, i), &mut out).unwrap(), "page {i}");
        assert!(out == random_page(i), "page {i} differs");
    }
    // A crash while the file system is full. Recovery writes a checkpoint:
    // if there is no room for it, it fails and changes nothing, and it
    // succeeds once there is.
    drop(c);
    drop(store);
    let store = match Store::recover(dir, config()) {
        Ok((store, rec)) => {
            println!("recovered on the full file system");
            assert_eq!(rec.pages, accepted.len() as u64);
            store
        }
        Err(e) => {
            println!("recovery on the full file system: {e}");
            assert!(e.to_string().contains(&*dir.to_string_lossy()), "{e}");
            std::fs::remove_file(&ballast).unwrap();
            let (store, rec) = Store::recover(dir, config()).unwrap();
            assert_eq!(rec.pages, accepted.len() as u64);
            store
        }
    };
    let c = store.client("vm").unwrap().data();
    for &i in &accepted {
        assert!(c.get(&handle(pool, 1, i), &mut out).unwrap(), "page {i}");
        assert!(out == random_page(i), "page {i} differs after recovery");
    }
    // Flushing the first half empties whole extents, which go back to the
    // file system: puts are accepted again.
    let (gone, kept) = accepted.split_at(accepted.len() / 2);
    for &i in gone {
        c.flush_page(&handle(pool, 1, i)).unwrap();
    }
    let mut again = Vec::new();
    for i in 10_000..10_016u64 {
        if c.put(&handle(pool, 1, i), &random_page(i), false).is_ok() {
            again.push(i);
        }
    }
    assert!(
        !again.is_empty(),
        "no put accepted after flushes freed room"
    );
    // A crash (no orderly stop), then recovery: every accepted page that
    // was not flushed is there.
    drop(c);
    drop(store);
    let (store, rec) = Store::recover(dir, config()).unwrap();
    assert_eq!(rec.pages, (kept.len() + again.len()) as u64);
    let c = store.client("vm").unwrap().data();
    for &i in kept.iter().chain(&again) {
        assert!(c.get(&handle(pool, 1, i), &mut out).unwrap(), "page {i}");
        assert!(out == random_page(i), "page {i} differs after recovery");
    }
    for &i in gone {
        assert!(!c.get(&handle(pool, 1, i), &mut out).unwrap(), "{i}");
    }
    println!("CHILD DONE");
}
