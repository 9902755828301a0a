//! Guest simulator (work in progress).
