//! Response cache: LRU with a byte budget and an optional time to live, keyed by a 128-bit
//! hash of model, version and every input's name, dtype, shape and bytes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln::TensorData;
use lru::LruCache;
use xxhash_rust::xxh3::Xxh3;

/// Cache key: a hash of everything that determines a model's outputs.
pub type CacheKey = u128;

/// Hashes model, version and the inputs (in the order given, which the caller fixes to the
/// model's input order).
pub fn cache_key(model: &str, version: u64, inputs: &[TensorData]) -> CacheKey {
    let mut h = Xxh3::new();
    let mut field = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(model.as_bytes());
    field(&version.to_le_bytes());
    for t in inputs {
        field(t.name.as_bytes());
        field(t.dtype.name().as_bytes());
        let dims: Vec<u8> = t.dims.iter().flat_map(|d| (*d as u64).to_le_bytes()).collect();
        field(&dims);
        match t.string_data() {
            Some(strings) => {
                for s in strings {
                    field(s);
                }
            }
            None => field(t.bytes()),
        }
    }
    h.digest128()
}

struct Entry {
    outputs: Arc<Vec<TensorData>>,
    bytes: usize,
    inserted: Instant,
}

struct Inner {
    lru: LruCache<CacheKey, Entry>,
    bytes: usize,
}

/// An LRU response cache with a byte budget and optional TTL; safe to share between threads.
pub struct ResponseCache {
    inner: Mutex<Inner>,
    max_bytes: usize,
    ttl: Option<Duration>,
}

fn tensor_bytes(t: &TensorData) -> usize {
    match t.string_data() {
        Some(s) => s.iter().map(|x| x.len() + 8).sum(),
        None => t.bytes().len(),
    }
}

impl ResponseCache {
    pub fn new(max_bytes: usize, ttl: Option<Duration>) -> Self {
        ResponseCache {
            inner: Mutex::new(Inner {
                // Bounded by bytes, not by entry count.
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            max_bytes,
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached outputs for `key`, if present and not expired.
    pub fn get(&self, key: CacheKey) -> Option<Arc<Vec<TensorData>>> {
        let mut inner = self.lock();
        let expired = match inner.lru.get(&key) {
            None => return None,
            Some(e) => self.ttl.is_some_and(|ttl| e.inserted.elapsed() > ttl),
        };
        if expired {
            if let Some(e) = inner.lru.pop(&key) {
                inner.bytes -= e.bytes;
            }
            return None;
        }
        inner.lru.get(&key).map(|e| e.outputs.clone())
    }

    /// Stores outputs, evicting least recently used entries to stay within the budget.
    /// Outputs larger than the whole budget are not stored.
    pub fn insert(&self, key: CacheKey, outputs: Arc<Vec<TensorData>>) {
        let bytes: usize = outputs.iter().map(tensor_bytes).sum::<usize>() + 64;
        if bytes > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
        if let Some(old) = inner.lru.pop(&key) {
            inner.bytes -= old.bytes;
        }
        while inner.bytes + bytes > self.max_bytes {
            match inner.lru.pop_lru() {
                Some((_, e)) => inner.bytes -= e.bytes,
                None => break,
            }
        }
        inner.bytes += bytes;
        inner.lru.push(
            key,
            Entry {
                outputs,
                bytes,
                inserted: Instant::now(),
            },
        );
    }

    /// Bytes currently held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Entries currently held.
    pub fn len(&self) -> usize {
        self.lock().lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, v: &[f32]) -> TensorData {
        TensorData::from_values(name, vec![v.len()], v).unwrap()
    }

    #[test]
    fn key_depends_on_everything() {
        let a = cache_key("m", 1, &[t("x", &[1.0, 2.0])]);
        assert_eq!(a, cache_key("m", 1, &[t("x", &[1.0, 2.0])]));
        assert_ne!(a, cache_key("m", 2, &[t("x", &[1.0, 2.0])]));
        assert_ne!(a, cache_key("n", 1, &[t("x", &[1.0, 2.0])]));
        assert_ne!(a, cache_key("m", 1, &[t("y", &[1.0, 2.0])]));
        assert_ne!(a, cache_key("m", 1, &[t("x", &[1.0, 3.0])]));
        let reshaped = TensorData::from_values("x", vec![1, 2], &[1.0f32, 2.0]).unwrap();
        assert_ne!(a, cache_key("m", 1, &[reshaped]));
        let as_i32 = TensorData::new("x", kiln::DType::I32, vec![2], t("x", &[1.0, 2.0]).bytes().to_vec()).unwrap();
        assert_ne!(a, cache_key("m", 1, &[as_i32]));
    }

    #[test]
    fn lru_eviction_within_budget() {
        // Each entry: 4 floats (16 bytes) + 64 overhead = 80 bytes; budget for two.
        let cache = ResponseCache::new(160, None);
        let out = |v: f32| Arc::new(vec![t("y", &[v; 4])]);
        cache.insert(1, out(1.0));
        cache.insert(2, out(2.0));
        assert!(cache.get(1).is_some()); // 1 is now most recent
        cache.insert(3, out(3.0)); // evicts 2
        assert!(cache.get(2).is_none());
        assert_eq!(cache.get(1).unwrap()[0].values::<f32>().unwrap(), vec![1.0; 4]);
        assert!(cache.get(3).is_some());
        assert_eq!(cache.bytes(), 160);
        cache.insert(4, Arc::new(vec![t("y", &[0.0; 100])])); // larger than the budget: skipped
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn ttl_zero_expires() {
        let cache = ResponseCache::new(1 << 20, Some(Duration::ZERO));
        cache.insert(1, Arc::new(vec![t("y", &[1.0])]));
        std::thread::sleep(Duration::from_millis(2));
        assert!(cache.get(1).is_none());
        assert_eq!(cache.bytes(), 0);
    }
}
