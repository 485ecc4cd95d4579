//! End-to-end tests: each starts the real binaries on loopback with
//! temporary state and talks to them as users' programs would.

mod browser;
mod meterd;
mod money;
mod support;
mod validator1;
mod web;
