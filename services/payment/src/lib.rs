//! The payment service: charges against each customer's credit limit; refunds
//! restore it. A declined payment is a normal business outcome, recorded as such.
//!
//! - [`domain`]: the `CreditAccount` aggregate, pure.
//! - [`api`]: the HTTP API of `contracts/payment.yaml`.
//! - [`read`]: an order's payments, from its store.

pub mod api;
pub mod domain;
pub mod read;
