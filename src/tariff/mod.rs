//! The credit calculator: message parts and per-destination prices.
