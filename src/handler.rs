//! Turns one request line into one answer: parse, call the service, build the response.

use crate::otp::{Otp, StatusReport};
use crate::protocol::{self, Body, DeliveryEventView, DeliveryView, Request, Response, timestamp};

/// The daemon's version, as `ping` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Answers one request line (without its `\n`). Never fails: every input gets an answer.
pub async fn respond(otp: &Otp, line: &[u8]) -> Response {
    let envelope = protocol::parse(line);
    let id = envelope.id;
    let request = match envelope.request {
        Ok(request) => request,
        Err(error) => return Response::from_protocol_error(id, error),
    };
    let result = match request {
        Request::Create(create) => otp.create(create).await.map(|created| {
            (
                201,
                Body::Created {
                    token: created.token,
                    expires_at: timestamp(created.expires_at),
                    channels: created.channels.iter().map(|c| c.as_str()).collect(),
                },
            )
        }),
        Request::Verify { token, code } => otp
            .verify(&token, &code)
            .await
            .map(|()| (200, Body::Verified { result: "valid" })),
        Request::Cancel { token } => otp.cancel(&token).await.map(|()| {
            (
                200,
                Body::Cancelled {
                    result: "cancelled",
                },
            )
        }),
        Request::Status { token } => otp
            .status(&token)
            .await
            .map(|report| (200, status_body(token, report))),
        Request::Stats => Ok((200, Body::Stats(otp.stats()))),
        Request::Ping => Ok((200, Body::Pong { version: VERSION })),
    };
    match result {
        Ok((status, body)) => Response::ok(id, status, body),
        Err(error) => Response::from_otp_error(id, &error),
    }
}

fn status_body(token: String, report: StatusReport) -> Body {
    let code = report.code;
    Body::Status {
        token,
        state: report.state.as_str(),
        created_at: code.as_ref().map(|c| timestamp(c.created_at)),
        expires_at: code.as_ref().map(|c| timestamp(c.expires_at)),
        attempts: report.attempts,
        locked_until: report.locked_until.map(timestamp),
        channels: code
            .as_ref()
            .map(|c| c.channels.iter().map(|c| c.as_str()).collect()),
        delivery: code.map(|c| DeliveryView {
            reference: c.delivery.reference,
            events: c
                .delivery
                .events
                .into_iter()
                .map(|event| DeliveryEventView {
                    at: timestamp(event.at),
                    status: event.status,
                    channel: event.channel,
                    detail: event.detail,
                })
                .collect(),
        }),
    }
}
