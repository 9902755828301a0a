// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Throughput, notification and latency benchmark (work in progress).
