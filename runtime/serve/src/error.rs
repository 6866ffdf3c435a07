//! Errors as clients see them: a status code and an OpenAI-shaped JSON
//! body, `{"error": {"message", "type", "param", "code"}}`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not the JSON the route takes (syntax, unknown field,
    /// wrong type), or a value in it is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// No token, or the wrong one.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The prompt (with `max_tokens`) does not fit the model's context:
    /// a `400` with OpenAI's code `context_length_exceeded`, which clients
    /// look for to shorten the conversation.
    #[error("{0}")]
    ContextLength(String),
    /// A workspace outside the allowed roots, or a policy a client may not
    /// give.
    #[error("{0}")]
    Forbidden(String),
    /// No such route or session.
    #[error("{0}")]
    NotFound(String),
    /// The session is busy (a turn is running) or already open.
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than the server takes.
    #[error("{0}")]
    TooLarge(String),
    /// A content type other than JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Too many sessions, or the queue is full.
    #[error("{0}")]
    TooMany(String),
    /// The model or the runtime failed.
    #[error("{0}")]
    Internal(String),
    /// The route exists, but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::ContextLength(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The OpenAI error `type`.
    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_)
            | ApiError::ContextLength(_)
            | ApiError::TooLarge(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::Conflict(_)
            | ApiError::MethodNotAllowed(_) => "invalid_request_error",
            ApiError::Unauthorized(_) => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::TooMany(_) => "rate_limit_error",
            ApiError::Internal(_) | ApiError::ShuttingDown => "server_error",
        }
    }

    /// The error as JSON, for a body or an SSE event.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": null,
                "code": match self {
                    ApiError::ContextLength(_) => serde_json::json!("context_length_exceeded"),
                    _ => serde_json::json!(self.status().as_u16()),
                },
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"stack-runtime\""),
            );
        }
        if matches!(self, ApiError::TooMany(_) | ApiError::ShuttingDown) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

/// A JSON body whose rejections are [`ApiError`]s: the status axum chose
/// (400, 413, 415, 422) with its explanation, which names the field and
/// line for a body that does not fit the route's type.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(from_rejection(rejection)),
        }
    }
}

fn from_rejection(rejection: JsonRejection) -> ApiError {
    let text = rejection.body_text();
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(format!(
            "the request body is larger than this server takes ({text})"
        )),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(
            "send the body as JSON (Content-Type: application/json)".into(),
        ),
        _ => ApiError::BadRequest(text),
    }
}

/// A route's path parameters (`{id}`), with axum's rejection (a segment
/// that is not UTF-8, say) as a JSON error like every other.
pub struct PathParams<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for PathParams<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(PathParams(value)),
            Err(rejection) => Err(ApiError::BadRequest(format!(
                "the request path: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// A route's query string, with axum's rejection (an unknown or malformed
/// parameter) as a JSON error like every other.
pub struct QueryParams<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(QueryParams(value)),
            Err(rejection) => Err(ApiError::BadRequest(format!(
                "the query string: {}",
                rejection.body_text()
            ))),
        }
    }
}
