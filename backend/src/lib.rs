// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vtmem host side: the tmem store (virtio-agnostic) and the vhost-user device.

pub mod store;
