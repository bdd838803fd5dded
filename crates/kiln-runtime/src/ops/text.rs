//! Operator family `text` (see the module list in `ops/mod.rs`).

use super::Registry;

pub fn register(_r: &mut Registry) {}
