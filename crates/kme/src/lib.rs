//! The dqkd Key Management Entity (KME).
//!
//! A KME serves the ETSI GS QKD 014 API to the SAEs of its site over mutual TLS. The
//! caller's SAE ID comes from its client certificate, never from the URL. Requests flow
//! one way: [`api`] (HTTP, status codes) → [`service`] (validation against the cluster,
//! authorisation, key life) → the key store and the key source. Other sites' KMEs reach
//! [`inbox`] through the peer API; this site reaches theirs through [`peer::Peer`].
//!
//! [`config`] turns the cluster manifest and the site file into a validated [`Config`];
//! [`server::run`] serves it until the shutdown future completes.

#![forbid(unsafe_code)]

pub mod api;
pub mod blast;
pub mod clock;
pub mod config;
mod error;
pub mod inbox;
pub mod issuer;
pub mod kekwatch;
pub mod keyid;
pub mod keysource;
pub mod peer;
pub mod pools;
mod scope;
pub mod server;
pub mod service;
mod shortest;
pub mod status;
pub mod telemetry;

pub use config::{Config, ConfigError, Manifest, SiteFile};
pub use error::ApiError;
pub use server::{run, ServeError, Serving};
