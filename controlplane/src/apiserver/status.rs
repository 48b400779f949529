//! API errors as `Status` objects (kube-apiserver's wire format).

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{registry::Resource, storage::StorageError};

/// One field problem inside an Invalid error.
#[derive(Debug, Clone)]
pub struct Cause {
    pub field: String,
    /// FieldValueRequired, FieldValueInvalid, FieldValueDuplicate, FieldValueNotSupported …
    pub reason: &'static str,
    pub message: String,
}

impl Cause {
    pub fn required(field: impl Into<String>) -> Self {
        Self { field: field.into(), reason: "FieldValueRequired", message: "Required value".into() }
    }
    pub fn invalid(field: impl Into<String>, value: impl std::fmt::Display, why: impl std::fmt::Display) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {}: {why}", json!(value.to_string())),
        }
    }
    pub fn duplicate(field: impl Into<String>, value: impl std::fmt::Display) -> Self {
        Self { field: field.into(), reason: "FieldValueDuplicate", message: format!("Duplicate value: {value}") }
    }
    pub fn not_supported(field: impl Into<String>, value: &str, allowed: &[&str]) -> Self {
        let allowed: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
        Self {
            field: field.into(),
            reason: "FieldValueNotSupported",
            message: format!("Unsupported value: \"{value}\": supported values: {}", allowed.join(", ")),
        }
    }
    pub fn forbidden(field: impl Into<String>, why: impl Into<String>) -> Self {
        Self { field: field.into(), reason: "FieldValueForbidden", message: format!("Forbidden: {}", why.into()) }
    }
    /// The whole object is over the store's value limit (no one field is at fault).
    pub fn too_large(size: usize, limit: usize) -> Self {
        Self {
            field: String::new(),
            reason: "FieldValueTooLong",
            message: format!("Too long: the object is {size} bytes, the limit is {limit} bytes"),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason} ({code}): {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

pub type ApiResult<T> = Result<T, ApiError>;

fn qualified(res: &Resource) -> String {
    if res.group.is_empty() { res.plural.to_string() } else { format!("{}.{}", res.plural, res.group) }
}

fn details(res: &Resource, name: &str) -> Value {
    json!({"name": name, "group": res.group, "kind": res.plural})
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None }
    }
    pub fn not_found(res: &Resource, name: &str) -> Self {
        Self { details: Some(details(res, name)), ..Self::new(404, "NotFound", format!("{} \"{name}\" not found", qualified(res))) }
    }
    pub fn already_exists(res: &Resource, name: &str) -> Self {
        Self {
            details: Some(details(res, name)),
            ..Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", qualified(res)))
        }
    }
    pub fn conflict(res: &Resource, name: &str, why: &str) -> Self {
        Self {
            details: Some(details(res, name)),
            ..Self::new(409, "Conflict", format!("Operation cannot be fulfilled on {} \"{name}\": {why}", qualified(res)))
        }
    }
    pub fn stale(res: &Resource, name: &str) -> Self {
        Self::conflict(res, name, "the object has been modified; please apply your changes to the latest version and try again")
    }
    pub fn invalid(res: &Resource, name: &str, causes: &[Cause]) -> Self {
        let kind_q = if res.group.is_empty() { res.kind.to_string() } else { format!("{}.{}", res.kind, res.group) };
        let msgs: Vec<String> = causes
            .iter()
            .map(|c| if c.field.is_empty() { c.message.clone() } else { format!("{}: {}", c.field, c.message) })
            .collect();
        let message = if msgs.len() == 1 {
            format!("{kind_q} \"{name}\" is invalid: {}", msgs[0])
        } else {
            format!("{kind_q} \"{name}\" is invalid: [{}]", msgs.join(", "))
        };
        let causes: Vec<Value> =
            causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect();
        Self {
            details: Some(json!({"name": name, "group": res.group, "kind": res.kind, "causes": causes})),
            ..Self::new(422, "Invalid", message)
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }
    /// kube-apiserver's answer to a body over the request limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(413, "RequestEntityTooLarge", format!("Request entity too large: limit is {limit}"))
    }
    pub fn too_many_requests(message: impl Into<String>) -> Self {
        Self::new(429, "TooManyRequests", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", format!("Internal error occurred: {}", message.into()))
    }
    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }
    pub fn not_found_path() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource")
    }

    /// Map a storage failure for `res`/`name`.
    pub fn storage(res: &Resource, name: &str, e: StorageError) -> Self {
        match e {
            StorageError::AlreadyExists { .. } => Self::already_exists(res, name),
            StorageError::NotFound { .. } => Self::not_found(res, name),
            StorageError::Conflict { .. } => Self::stale(res, name),
            StorageError::Compacted { requested, compacted } => Self::expired(format!(
                "too old resource version: {requested} ({compacted})"
            )),
            StorageError::TooLarge { size, limit, .. } => Self::invalid(res, name, &[Cause::too_large(size, limit)]),
            other => Self::internal(other.to_string()),
        }
    }

    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Compacted { requested, compacted } => {
                Self::expired(format!("too old resource version: {requested} ({compacted})"))
            }
            StorageError::TooLarge { ref key, size, limit } => match crate::registry::parse_key(key) {
                Some((res, _, name)) => Self::invalid(res, &name, &[Cause::too_large(size, limit)]),
                None => Self::new(422, "Invalid", format!("{key}: {}", Cause::too_large(size, limit).message)),
            },
            other => Self::internal(other.to_string()),
        }
    }
}

pub fn json_response(code: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = (code, bytes).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.to_status())
    }
}
