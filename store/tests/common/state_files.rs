// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The files of a state directory, for tests that cut or read them.

use std::path::{Path, PathBuf};

/// The journal of domain `n` in the state directory `path`.
pub fn journal_of(path: &Path, n: u32) -> PathBuf {
    let prefix = format!("d{n}.journal.");
    std::fs::read_dir(path)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        })
        .expect("the domain has a journal")
}
