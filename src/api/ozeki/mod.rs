//! The Ozeki NG HTTP API front door.
