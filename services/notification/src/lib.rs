//! The notification service: records the messages it would send to customers (a
//! demonstration stand-in for e-mail or push). Its failure rate is a demonstration
//! knob of its adapter, not of its domain.
//!
//! - [`domain`]: the `Mailbox` aggregate, pure.
//! - [`api`]: the HTTP API of `contracts/notification.yaml`.

pub mod api;
pub mod domain;
