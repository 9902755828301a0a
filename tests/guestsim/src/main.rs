// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmem-guestsim`: command-line front end of the guest simulator.

fn main() {}
