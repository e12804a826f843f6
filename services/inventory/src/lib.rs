//! The inventory service: stock per SKU, and reservations that hold stock until the
//! order ships (confirmed) or fails (released).
//!
//! - [`domain`]: the `Item` aggregate, pure.
//! - [`api`]: the HTTP API of `contracts/inventory.yaml`.

pub mod api;
pub mod domain;
