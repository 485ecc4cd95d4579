//! End-to-end tests: each starts the real binaries on loopback with
//! temporary state and talks to them as users' programs would.

/// The TACA examples, built once for all tests.
#[path = "../../backoffice/tests/it/examples.rs"]
mod examples;

mod browser;
mod hostile;
mod itemised;
mod meterd;
mod meterd_connections;
mod money;
mod parlayx;
mod readme;
mod support;
mod traffic;
mod validator1;
mod web;
