//! Graph rewrite passes. One file per pass; each is a named rule.

pub mod dce;
