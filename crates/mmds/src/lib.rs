//! flatlet's microVM metadata service (MMDS), as Firecracker has it: a
//! JSON data store the host fills through the API, and an HTTP server the
//! guest reaches at a link-local address over the network interfaces the
//! host lists.
//!
//! - [`store`]: the data store, its size limit, merge patches, the IMDS
//!   text format and V2 session tokens;
//! - [`http`]: the guest's requests and their answers;
//! - [`stack`]: Ethernet, ARP, IPv4 and TCP (smoltcp) between a net
//!   device and the HTTP side;
//! - [`config`]: `PUT /mmds/config` and the config file's `mmds-config`.

pub mod config;
pub mod http;
pub mod stack;
pub mod store;

pub use config::{MmdsConfig, MmdsConfigError};
pub use stack::{DEFAULT_IPV4, MmdsStack, StackCounters};
pub use store::{DEFAULT_SIZE_LIMIT, Mmds, MmdsVersion, StoreError};
