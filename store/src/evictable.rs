// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which ephemeral pools each client owns: where its evictions look.
//!
//! A pool holds the account of its owner; the owner's list holds the pool
//! weakly. The lists live here, apart from both, so that accounting knows
//! nothing of pools. They change only when a pool opens, closes or changes
//! owner, never on the data path.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::account::Acct;
use super::pool::Pool;

/// Per client (by id), the ephemeral pools charged to it.
#[derive(Debug, Default)]
pub(crate) struct EvictableLists {
    lists: Mutex<HashMap<u64, Vec<Weak<Pool>>>>,
}

impl EvictableLists {
    /// `owner` is now charged for `pool`'s pages.
    pub fn add(&self, owner: &Acct, pool: &Arc<Pool>) {
        let mut lists = self.lists.lock();
        let list = lists.entry(owner.client_id).or_default();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(pool));
    }

    /// `owner` is no longer charged for `pool`'s pages.
    pub fn remove(&self, owner: &Acct, pool: &Pool) {
        let mut lists = self.lists.lock();
        if let Some(list) = lists.get_mut(&owner.client_id) {
            list.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), pool));
            if list.is_empty() {
                lists.remove(&owner.client_id);
            }
        }
    }

    /// The live pools charged to `owner`.
    pub fn pools_of(&self, owner: &Acct) -> Vec<Arc<Pool>> {
        self.lists
            .lock()
            .get(&owner.client_id)
            .map(|list| list.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default()
    }
}
