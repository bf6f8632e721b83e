//! Mapping object_store errors onto the domain's, naming bucket and key,
//! never a credential.

use backup_core::Error;
use object_store::path::Path;

/// A store error with a plain reason.
pub(crate) fn store_err(location: &str, key: &Path, reason: String) -> Error {
    Error::Store {
        location: location.to_owned(),
        key: key.to_string(),
        reason,
        source: None,
    }
}

/// Maps an object_store error, naming the common cases plainly: by the
/// error's variant, by the kind of a failed connection ([`HttpError`] in
/// the source chain), and by the S3 error code (`<Code>` of the response
/// body, S3's machine-readable field, which object_store quotes). The HTTP
/// status itself is not reachable: object_store 0.14 keeps its retry error
/// type private.
///
/// [`HttpError`]: object_store::client::HttpError
pub(crate) fn map_err(location: &str, key: &Path, e: object_store::Error) -> Error {
    let text = e.to_string();
    let reason = match &e {
        object_store::Error::NotFound { .. } => format!("not found: {text}"),
        object_store::Error::PermissionDenied { .. } => format!("permission denied: {text}"),
        object_store::Error::Unauthenticated { .. } => AUTH_FAILED.to_owned(),
        _ => classify(&e, &text).unwrap_or(text),
    };
    Error::Store {
        location: location.to_owned(),
        key: key.to_string(),
        reason,
        source: Some(Box::new(e)),
    }
}

const AUTH_FAILED: &str = "authentication failed: check the access key id and secret";

/// The plain reason of a failed request.
fn classify(e: &object_store::Error, text: &str) -> Option<String> {
    use object_store::client::{HttpError, HttpErrorKind};
    match s3_code(text) {
        Some("NoSuchBucket") => return Some("the bucket does not exist".to_owned()),
        Some("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "InvalidSecurity") => {
            return Some(AUTH_FAILED.to_owned());
        }
        Some("AccessDenied") => return Some(format!("permission denied: {text}")),
        _ => {}
    }
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(http) = err.downcast_ref::<HttpError>() {
            match http.kind() {
                HttpErrorKind::Connect => {
                    return Some(format!("endpoint unreachable (cannot connect): {text}"));
                }
                HttpErrorKind::Timeout => {
                    return Some(format!("endpoint unreachable (no answer in time): {text}"));
                }
                _ => {}
            }
        }
        current = err.source();
    }
    None
}

/// The S3 error code of an error response body (`<Code>NoSuchBucket</Code>`).
fn s3_code(body: &str) -> Option<&str> {
    let start = body.find("<Code>")? + "<Code>".len();
    let len = body[start..].find("</Code>")?;
    Some(body[start..start + len].trim()).filter(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::s3_code;

    #[test]
    fn s3_error_codes_are_read_from_the_response_body() {
        let body =
            "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>x</Message></Error>";
        assert_eq!(s3_code(body), Some("NoSuchBucket"));
        assert_eq!(s3_code("<Error></Error>"), None);
        assert_eq!(s3_code("<Code></Code>"), None);
    }
}
