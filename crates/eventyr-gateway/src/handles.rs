//! Metric handles made once per label set and kept: a request records into a handle
//! instead of building a key (allocating its labels) and looking it up in the
//! registry. Handles are made at first use, so a recorder installed after the
//! gateway was built is still the one they record into.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::RwLock;

/// Handles of one metric, by label values.
#[derive(Debug)]
pub struct Handles<K, M> {
    made: RwLock<HashMap<K, M>>,
}

impl<K, M> Default for Handles<K, M> {
    fn default() -> Self {
        Self {
            made: RwLock::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq, M: Clone> Handles<K, M> {
    /// The handle of `key`, made by `make` the first time.
    pub fn get(&self, key: K, make: impl FnOnce(&K) -> M) -> M {
        if let Some(handle) = self
            .made
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return handle.clone();
        }
        let handle = make(&key);
        self.made
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key)
            .or_insert(handle)
            .clone()
    }
}
