//! `GET /metrics`: the counters in Prometheus' text exposition format (version 0.0.4).

use std::fmt::Write;

use hyper::StatusCode;
use hyper::header::{self, HeaderValue};

use super::webhooks::Webhooks;
use super::{Answer, text};
use crate::metrics::HistogramSnapshot;
use crate::otp::Otp;

/// Renders every metric family.
pub fn render(otp: &Otp, webhooks: &Webhooks) -> Answer {
    let stats = otp.stats();
    let counters = otp.counters();
    let mut out = Exposition::default();
    let single = [
        (
            "otpd_codes_created_total",
            "counter",
            "Codes issued and handed to the delivery backend.",
            stats.created,
        ),
        (
            "otpd_codes_verified_total",
            "counter",
            "Codes verified successfully.",
            stats.verified,
        ),
        (
            "otpd_codes_expired_total",
            "counter",
            "Codes that reached their expiry unverified.",
            stats.expired,
        ),
        (
            "otpd_codes_cancelled_total",
            "counter",
            "Codes cancelled by the application.",
            stats.cancelled,
        ),
        (
            "otpd_items_purged_total",
            "counter",
            "Finished items removed by the janitor.",
            stats.purged,
        ),
        (
            "otpd_delivery_attempts_total",
            "counter",
            "Requests sent to the delivery provider (Vonage), retries included; one otpd \
             could not sign is not sent, so not counted.",
            stats.delivery_attempts,
        ),
        (
            "otpd_live_codes",
            "gauge",
            "Codes issued and not yet verified, cancelled, locked or expired.",
            stats.live,
        ),
        (
            "otpd_uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
            stats.uptime_secs,
        ),
    ];
    for (name, kind, help, value) in single {
        out.single(name, kind, help, value);
    }
    out.counters_by(
        "otpd_failures_total",
        "Failures by reason: verifies of a wrong code or unknown token answered 404 \
         (wrong_code; the guess that locks a token counts as locked instead), tokens \
         locked after too many wrong codes, once per lock, not per request refused \
         while locked (locked), creates refused by a send limit (rate_limited), \
         creates whose delivery was refused or unavailable (delivery_failed), requests \
         answered 500 because the store failed (storage_failed).",
        "reason",
        [
            ("wrong_code", stats.failed),
            ("locked", stats.locked),
            ("rate_limited", stats.rate_limited),
            ("delivery_failed", stats.delivery_failed),
            ("storage_failed", stats.storage_failed),
        ],
    );
    out.counters_by(
        "otpd_deliveries_total",
        "Messages handed to the delivery provider (Vonage), by outcome: accepted, \
         refused (4xx, or a request otpd could not sign), or unavailable after retries.",
        "outcome",
        [
            ("sent", stats.delivery_sent),
            ("refused", stats.delivery_refused),
            ("unavailable", stats.delivery_unavailable),
        ],
    );
    out.counters_by(
        "otpd_delivery_events_total",
        "Provider status reports recorded on a code, by status.",
        "status",
        webhooks.status_counts(),
    );
    out.counters_by(
        "otpd_webhooks_total",
        "Status webhooks received, by what became of them.",
        "outcome",
        webhooks.outcome_counts(),
    );
    out.histogram(
        "otpd_request_duration_seconds",
        "Time to answer a request, by listener.",
        &[
            ("socket", counters.socket_latency.snapshot()),
            ("http", counters.http_latency.snapshot()),
        ],
    );
    let mut answer = text(StatusCode::OK, &out.0);
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    answer
}

/// The text being built.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// A family of one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.header(name, kind, help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    /// A counter family with one sample per value of `label`.
    fn counters_by<'a>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        counts: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        self.header(name, "counter", help);
        for (value, count) in counts {
            let _ = writeln!(self.0, "{name}{{{label}=\"{value}\"}} {count}");
        }
    }

    /// A histogram family, one series per `listener`.
    fn histogram(&mut self, name: &str, help: &str, series: &[(&str, HistogramSnapshot)]) {
        self.header(name, "histogram", help);
        for (listener, snapshot) in series {
            for (bound_us, count) in &snapshot.cumulative {
                let le = *bound_us as f64 / 1e6;
                let _ = writeln!(
                    self.0,
                    "{name}_bucket{{listener=\"{listener}\",le=\"{le}\"}} {count}"
                );
            }
            let count = snapshot.count;
            let sum = snapshot.sum_us as f64 / 1e6;
            let _ = writeln!(
                self.0,
                "{name}_bucket{{listener=\"{listener}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(self.0, "{name}_sum{{listener=\"{listener}\"}} {sum}");
            let _ = writeln!(self.0, "{name}_count{{listener=\"{listener}\"}} {count}");
        }
    }
}
