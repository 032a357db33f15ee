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
        out.family(name, kind, help, &[("", value)]);
    }
    out.family(
        "otpd_failures_total",
        "counter",
        "Refused requests by reason: wrong code or unknown token, token locked after \
         too many wrong codes, rate limit, delivery refused or unavailable.",
        &[
            ("reason=\"wrong_code\"", stats.failed),
            ("reason=\"locked\"", stats.locked),
            ("reason=\"rate_limited\"", stats.rate_limited),
            ("reason=\"delivery_failed\"", stats.delivery_failed),
        ],
    );
    let statuses: Vec<(String, u64)> = webhooks
        .status_counts()
        .map(|(status, n)| (format!("status=\"{status}\""), n))
        .collect();
    out.family(
        "otpd_delivery_events_total",
        "counter",
        "Provider status reports recorded on a code, by status.",
        &labelled(&statuses),
    );
    let outcomes: Vec<(String, u64)> = webhooks
        .outcome_counts()
        .map(|(outcome, n)| (format!("outcome=\"{outcome}\""), n))
        .collect();
    out.family(
        "otpd_webhooks_total",
        "counter",
        "Status webhooks received, by what became of them.",
        &labelled(&outcomes),
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

fn labelled(samples: &[(String, u64)]) -> Vec<(&str, u64)> {
    samples.iter().map(|(l, n)| (l.as_str(), *n)).collect()
}

/// The text being built.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// A counter or gauge family: one sample per `(labels, value)`.
    fn family(&mut self, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
        self.header(name, kind, help);
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(self.0, "{name} {value}");
            } else {
                let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
            }
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
