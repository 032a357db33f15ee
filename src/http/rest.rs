//! The tutorial service's REST API, with its status codes and plain-text bodies, so
//! clients written for it work unchanged: `POST /otp/:token` and `GET /otp/:token/:code`.
//!
//! Both go through [`Otp`], like the socket's `create` and `verify`. Answers the
//! tutorial never gave (rate limits, delivery failures) are documented in README.md.

use hyper::StatusCode;
use hyper::header::{self, HeaderValue};
use serde_json::{Map, Value};

use super::{Answer, text};
use crate::otp::{Otp, OtpError};
use crate::protocol;

/// `POST /otp/:token` with `{"messengerId":..,"phoneNumber":..}`: 201 `Created`.
pub async fn create(otp: &Otp, token: &str, body: &[u8]) -> Answer {
    let Some(token) = percent_decode(token) else {
        return bad_request("token: bad percent-encoding");
    };
    // The body is JSON whatever its Content-Type says: `curl -d` sends JSON labelled as
    // a form, and the tutorial's clients should not have to care.
    let object = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match crate::strict_json::parse_json(body) {
            Ok((Value::Object(object), duplicates)) if duplicates.is_empty() => object,
            Ok((Value::Object(_), duplicates)) => {
                return bad_request(&protocol::given_twice(&duplicates[0]).message);
            }
            Ok(_) => return bad_request("body: must be a JSON object"),
            Err(e) => return bad_request(&format!("body: not valid JSON: {e}")),
        }
    };
    let request = match protocol::parse_create(&object, Some(&token)) {
        Ok(request) => request,
        Err(error) => return bad_request(&error.message),
    };
    if request.to.messenger.is_none() && request.to.sms.is_none() {
        return bad_request("messengerId, phoneNumber: at least one is required");
    }
    match otp.create(request).await {
        Ok(_) => text(StatusCode::CREATED, "Created"),
        Err(error) => refusal(&error),
    }
}

/// `GET /otp/:token/:code`: 200 `OK`, or the refusal.
pub async fn verify(otp: &Otp, token: &str, code: &str) -> Answer {
    let Some(token) = percent_decode(token) else {
        return bad_request("token: bad percent-encoding");
    };
    let Some(code) = percent_decode(code) else {
        return bad_request("code: bad percent-encoding");
    };
    match otp.verify(&token, &code).await {
        Ok(()) => text(StatusCode::OK, "OK"),
        Err(error) => refusal(&error),
    }
}

fn bad_request(message: &str) -> Answer {
    text(StatusCode::BAD_REQUEST, message)
}

/// The tutorial's body for each refusal (and otpd's own for those it lacked).
fn refusal(error: &OtpError) -> Answer {
    let body = match error {
        OtpError::BadRequest { .. } => return bad_request(&error.to_string()),
        OtpError::NotFound | OtpError::NothingPending => "Not found",
        OtpError::AlreadyVerified => "The code has already been verified",
        OtpError::Expired => "The code is expired",
        OtpError::TooManyAttempts { .. } => "Too many attempts",
        OtpError::RateLimited { .. } => "Too many requests",
        OtpError::DeliveryFailed(_) => "The code could not be delivered",
        OtpError::DeliveryUnavailable(_) => "Delivery is unavailable; try again later",
        OtpError::Storage(_) => "Internal error",
    };
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut answer = text(status, body);
    if let Some(secs) = error.retry_after_secs() {
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    answer
}

/// Decodes `%XX` escapes in a path segment, as Express did for route parameters.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Ab").as_deref(), Some("a:b"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%+1"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
    }

    #[test]
    fn refusals_carry_the_tutorial_bodies_and_retry_after() {
        let answer = refusal(&OtpError::TooManyAttempts {
            retry_after_secs: 42,
        });
        assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(answer.headers()[header::RETRY_AFTER], "42");
        assert_eq!(refusal(&OtpError::Expired).status(), StatusCode::GONE);
    }
}
