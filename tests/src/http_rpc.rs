//! XML-RPC over HTTP on axum: one POST route, a body limit, and `proto`'s
//! codec doing the rest. `run` serves until `shutdown` completes.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::post;
use proto::Fault;
use proto::xmlrpc::{Limits, MethodCall, Value, handle_call};
use tokio::net::TcpListener;

/// What answers a parsed call.
pub type Dispatch = Arc<dyn Fn(MethodCall) -> Result<Value, Fault> + Send + Sync>;

#[derive(Clone)]
struct Service {
    limits: Limits,
    dispatch: Dispatch,
}

/// A router that answers XML-RPC on `POST /RPC2` (and `POST /`), refusing
/// bodies over `limits.body_bytes_max` with HTTP 413 before reading them whole.
pub fn router(limits: Limits, dispatch: Dispatch) -> Router {
    let service = Service { limits, dispatch };
    Router::new()
        .route("/RPC2", post(answer))
        .route("/", post(answer))
        .layer(DefaultBodyLimit::max(limits.body_bytes_max))
        .with_state(service)
}

async fn answer(State(service): State<Service>, body: Bytes) -> impl IntoResponse {
    let dispatch = Arc::clone(&service.dispatch);
    let response = handle_call(&body, service.limits, move |call| dispatch(call));
    ([(CONTENT_TYPE, "text/xml")], response)
}

/// Serves `router` on `listener` until `shutdown` completes, then lets calls
/// in flight finish.
pub async fn run(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
