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

/// Maps an object_store error, naming the common cases plainly.
pub(crate) fn map_err(location: &str, key: &Path, e: object_store::Error) -> Error {
    let text = e.to_string();
    let reason = match &e {
        object_store::Error::NotFound { .. } => format!("not found: {text}"),
        object_store::Error::PermissionDenied { .. } => format!("permission denied: {text}"),
        object_store::Error::Unauthenticated { .. } => {
            "authentication failed: check the access key id and secret".to_owned()
        }
        _ if text.contains("NoSuchBucket") || text.contains("bucket does not exist") => {
            "the bucket does not exist".to_owned()
        }
        _ if text.contains("InvalidAccessKeyId") || text.contains("SignatureDoesNotMatch") => {
            "authentication failed: check the access key id and secret".to_owned()
        }
        _ if text.contains("error sending request")
            || text.contains("Connection refused")
            || text.contains("tcp connect") =>
        {
            format!("endpoint unreachable: {text}")
        }
        _ => text,
    };
    Error::Store {
        location: location.to_owned(),
        key: key.to_string(),
        reason,
        source: Some(Box::new(e)),
    }
}
