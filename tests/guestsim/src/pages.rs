// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page contents for the benchmarks: real OS files (shared libraries,
//! documentation text), zero pages, and the test kit's synthetic pages
//! where the files run out.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use vtmem_testkit::handle;

use crate::{Error, Page, Result, Status, Vm, PAGE_SIZE};

pub use vtmem_testkit::{checksum, random_page, text_page};

/// Where [`Corpus::load`] found its pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CorpusMix {
    /// Pages from shared libraries.
    pub library: usize,
    /// Pages from documentation text.
    pub text: usize,
    /// Zero pages.
    pub zero: usize,
    /// Synthetic pages used because the files ran out.
    pub synthetic: usize,
}

/// A set of pages for benchmarks.
#[derive(Debug)]
pub struct Corpus {
    /// The pages.
    pub pages: Vec<Box<Page>>,
    /// Their origin.
    pub mix: CorpusMix,
}

fn list_files(dir: &Path, pred: &dyn Fn(&Path) -> bool, out: &mut Vec<PathBuf>, depth: u32) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() && depth > 0 {
            list_files(&p, pred, out, depth - 1);
        } else if md.is_file() && pred(&p) {
            out.push(p);
        }
    }
}

fn read_pages(files: &[PathBuf], want: usize, out: &mut Vec<Box<Page>>) -> usize {
    let mut got = 0;
    for f in files {
        if got >= want {
            break;
        }
        let Ok(mut file) = fs::File::open(f) else {
            continue;
        };
        let mut data = Vec::new();
        if file
            .by_ref()
            .take(((want - got) * PAGE_SIZE) as u64)
            .read_to_end(&mut data)
            .is_err()
        {
            continue;
        }
        for chunk in data.chunks(PAGE_SIZE) {
            let mut p: Box<Page> = Box::new([0u8; PAGE_SIZE]);
            p[..chunk.len()].copy_from_slice(chunk);
            out.push(p);
            got += 1;
        }
    }
    got
}

impl Corpus {
    /// About `n` pages: 45% from `/usr/lib/x86_64-linux-gnu/*.so*`, 45%
    /// from text files under `/usr/share/doc`, 10% zero pages, interleaved
    /// so that any stretch of the corpus has the same mix. Synthetic text
    /// pages fill in where the files run out.
    pub fn load(n: usize) -> Corpus {
        let mut libs = Vec::new();
        list_files(
            Path::new("/usr/lib/x86_64-linux-gnu"),
            &|p: &Path| {
                p.file_name()
                    .and_then(|s| s.to_str())
                    .is_some_and(|s| s.contains(".so"))
            },
            &mut libs,
            0,
        );
        let mut docs = Vec::new();
        list_files(
            Path::new("/usr/share/doc"),
            &|p: &Path| {
                let name = p.file_name().and_then(|s| s.to_str()).unwrap_or("");
                !name.ends_with(".gz") && !name.ends_with(".png") && !name.ends_with(".jpg")
            },
            &mut docs,
            3,
        );
        let n_zero = n / 10;
        let n_lib = (n - n_zero) / 2;
        let n_text = n - n_zero - n_lib;
        let mut lib_pages = Vec::new();
        let library = read_pages(&libs, n_lib, &mut lib_pages);
        let mut text_pages = Vec::new();
        let text = read_pages(&docs, n_text, &mut text_pages);
        let mut mix = CorpusMix {
            library,
            text,
            zero: 0,
            synthetic: 0,
        };
        let mut pages = Vec::with_capacity(n);
        let (mut li, mut ti, mut zi) = (lib_pages.into_iter(), text_pages.into_iter(), 0usize);
        for i in 0..n {
            let pick = i % 10;
            let p = if pick == 9 && zi < n_zero {
                zi += 1;
                Some(Box::new([0u8; PAGE_SIZE]))
            } else if pick % 2 == 0 {
                li.next().or_else(|| ti.next())
            } else {
                ti.next().or_else(|| li.next())
            };
            pages.push(p.unwrap_or_else(|| {
                mix.synthetic += 1;
                Box::new(text_page(i as u64))
            }));
        }
        mix.zero = zi;
        Corpus { pages, mix }
    }
}

impl Corpus {
    /// Stores page `i` of the corpus at index `i` of object 1 of `pool`,
    /// in batches of 128; fails on the first status that is not `OK`.
    pub fn store(&self, vm: &Vm, pool: u32) -> Result<()> {
        for (c, chunk) in self.pages.chunks(128).enumerate() {
            let batch: Vec<_> = chunk
                .iter()
                .enumerate()
                .map(|(i, p)| (handle(pool, 1, (c * 128 + i) as u64), &**p))
                .collect();
            if let Some(s) = vm.put_batch(&batch)?.iter().find(|s| **s != Status::Ok) {
                return Err(Error::Status(*s));
            }
        }
        Ok(())
    }

    /// Reads every `step`-th page stored by [`Corpus::store`] back from
    /// `vm` and compares it.
    pub fn verify_sample(&self, vm: &Vm, pool: u32, step: usize) -> Result<()> {
        let sample: Vec<usize> = (0..self.pages.len()).step_by(step.max(1)).collect();
        for chunk in sample.chunks(64) {
            let hs: Vec<_> = chunk.iter().map(|&i| handle(pool, 1, i as u64)).collect();
            for (&i, (s, page)) in chunk.iter().zip(vm.get_batch(&hs)?) {
                if s != Status::Ok || *page != *self.pages[i] {
                    return Err(Error::Device(format!(
                        "page {i} came back {s} or different"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Options of the benchmarks that fill one VM's persistent pool with the
/// corpus (`migrate`, `upgrade`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CorpusRunOptions {
    /// Pages the VM stores (default 262144, 1 GiB; 16384 with --quick).
    #[arg(long, value_name = "N")]
    pub pages: Option<usize>,
    /// Short run.
    #[arg(long)]
    pub quick: bool,
    /// vtmemd binary (default: $VTMEMD, else the vtmemd next to this
    /// executable).
    #[arg(long, value_name = "PATH", env = "VTMEMD")]
    pub vtmemd: Option<PathBuf>,
}

impl CorpusRunOptions {
    /// Pages to store.
    pub fn pages(&self) -> usize {
        self.pages
            .unwrap_or(if self.quick { 16_384 } else { 262_144 })
    }
}
