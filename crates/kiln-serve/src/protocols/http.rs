//! What the HTTP protocols share: the handlers' state, the JSON error response, `/metrics` and the
//! fallback 404. The router that puts the protocols together is [`super::http_router`].

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::error::{ErrorKind, ServeError};
use crate::manager::ModelManager;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    pub manager: Arc<ModelManager>,
    /// Required on repository load/unload when set.
    pub control_token: Option<crate::auth::ControlToken>,
}

/// An error answered as `{"error": "..."}` with the status of its kind.
pub struct HttpError(pub StatusCode, pub String);

/// The HTTP status of an error kind (every HTTP protocol answers the same).
pub(crate) fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<ServeError> for HttpError {
    fn from(e: ServeError) -> Self {
        HttpError(status_of(e.kind()), e.to_string())
    }
}

impl From<BytesRejection> for HttpError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body is larger than the server's limit (--max-body-bytes)".to_string()
        } else {
            format!("reading the request body: {}", r.body_text())
        };
        HttpError(status, msg)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if self.0 == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the oversize body is never read, so the connection cannot carry another
            // request: say so, or a keep-alive client reuses it and its next request fails.
            return (
                self.0,
                [(axum::http::header::CONNECTION, "close")],
                Json(json!({ "error": self.1 })),
            )
                .into_response();
        }
        if self.0 == StatusCode::UNAUTHORIZED {
            return (
                self.0,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({ "error": self.1 })),
            )
                .into_response();
        }
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub(crate) type HttpResult<T> = Result<T, HttpError>;

/// `/metrics` (Prometheus text), on the HTTP port and on the separate metrics port.
pub(crate) fn metrics_routes() -> Router<HttpState> {
    Router::new().route("/metrics", get(metrics))
}

/// The answer to a path no protocol routes.
pub(crate) async fn not_found() -> HttpError {
    HttpError(StatusCode::NOT_FOUND, "no such endpoint".into())
}

async fn metrics(State(st): State<HttpState>) -> Response {
    let mut text = st.manager.metrics().render();
    text.push_str(&crate::llm::LlmMetrics::global().render(&st.manager.llms()));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        text,
    )
        .into_response()
}
