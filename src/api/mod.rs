//! Front doors: each parses client requests into typed commands and renders
//! typed answers. Nothing here touches a balance directly.

pub mod boxis;
pub mod multipart;
pub mod owned;
pub mod ozeki;
pub mod percent;
pub mod soap;
