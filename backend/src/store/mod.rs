//! The tmem store.
