//! flatlet's REST API: Firecracker's paths, bodies and status codes for
//! what flatlet implements, served over a Unix socket by an API thread
//! that hands every request to the VMM thread. Also a small client.

pub mod client;
pub mod routes;
pub mod server;
