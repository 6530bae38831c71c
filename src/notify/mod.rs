//! Notifications tollgate sends on its own: low-balance webhooks.
//!
//! [`low_balance`] decides when an account crossed below its threshold;
//! [`webhook`] makes the signed body. Delivery goes through the durable
//! outbox, so a notification survives restarts and is retried until the
//! receiver answers 2xx or `give_up_after` passes.

pub mod low_balance;
pub mod webhook;
