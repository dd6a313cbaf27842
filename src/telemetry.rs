//! Logging and the Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Installs the global Prometheus recorder once and returns its handle (later calls return the
/// same handle). Durations are histograms with explicit buckets, not summaries.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::store::BATCH_ROWS.to_owned()),
                        &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 2048.0, 4096.0],
                    )
                })
                .and_then(PrometheusBuilder::install_recorder)
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "Prometheus recorder not installed; metrics are off");
                    PrometheusBuilder::new().build_recorder().handle()
                });
            switchboard_actors::telemetry::describe();
            crate::cluster::metrics::describe();
            metrics::describe_histogram!(
                crate::store::BATCH_ROWS,
                "Writes per group-committed store batch"
            );
            metrics::describe_histogram!(
                crate::store::COMMIT_SECONDS,
                metrics::Unit::Seconds,
                "Time to commit one store batch"
            );
            handle
        })
        .clone()
}

/// Structured logs to stderr, panics included as one line each; `RUST_LOG` overrides
/// `default_filter`.
pub fn init_logging(default_filter: &str, json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    log_panics();
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Reports panics (actor crashes among them) as one structured log line on the
/// `switchboard::panic` target instead of raw text on stderr; the supervisor restarts the actor.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(target: "switchboard::panic", %location, %message, "panic");
    }));
}
