//! The service itself: the router, its handlers, the offloaded key derivation, and how an
//! `offload::Error` becomes an HTTP status. `examples/service.rs` runs it; `tests/service.rs`
//! includes this file too and tests it over loopback.

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use offload::offload;
use pbkdf2::sha2::Sha256;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// Requests with a larger body are refused with 413 before any of it is parsed.
pub const BODY_LIMIT: usize = 4 * 1024;
/// The most PBKDF2 iterations a request may ask for: seconds of work. The offloaded path
/// gives up after two seconds (504); the inline path cannot stop, and holds a runtime thread
/// until it is done.
pub const MAX_ITERATIONS: u32 = 20_000_000;
/// Once the server has drained, how long offload lets calls still running (normally none)
/// go on before it kills their workers.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `POST /hash` and `POST /hash/inline` take this JSON body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashRequest {
    /// The password to derive a key from.
    pub password: String,
    /// The salt, as given.
    pub salt: String,
    /// PBKDF2 iterations: `1..=MAX_ITERATIONS`.
    pub iterations: u32,
}

/// The answer to a [`HashRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashResponse {
    /// Always `"pbkdf2-sha256"`.
    pub algorithm: String,
    /// The iterations that were run.
    pub iterations: u32,
    /// The 32-byte derived key, in lowercase hex.
    pub hash: String,
}

/// PBKDF2-HMAC-SHA256 with a 32-byte output: the CPU-heavy work, plain synchronous Rust.
pub fn pbkdf2_sha256(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations)
}

/// [`pbkdf2_sha256`] in a worker process, with a two-second budget. Workers are the cores
/// less two (at least one), so the runtime and the rest of the machine keep some; a burst
/// beyond 64 waiting calls is turned away at once (503) rather than left to time out.
#[offload(timeout = "2s", workers = "cpus-2", queue = 64, overload = "reject")]
pub fn derive_key(password: Vec<u8>, salt: Vec<u8>, iterations: u32) -> [u8; 32] {
    pbkdf2_sha256(&password, &salt, iterations)
}

/// The service's routes.
pub fn router() -> Router {
    let router = Router::new()
        .route("/hash", post(hash))
        .route("/hash/inline", post(hash_inline))
        .route("/healthz", get(healthz));
    // With `--features metrics` offload publishes its figures through the `metrics` facade:
    // install the recorder now, so that it sees every call.
    #[cfg(feature = "metrics")]
    let router = {
        prometheus();
        router.route("/metrics", get(metrics))
    };
    router.layer(DefaultBodyLimit::max(BODY_LIMIT))
}

/// `GET /metrics`, with `--features metrics`: offload's figures for every pool (calls by
/// outcome, worker restarts by cause, queue wait and run time) as Prometheus text.
#[cfg(feature = "metrics")]
async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], prometheus().render())
}

/// The process's Prometheus recorder, installed by the first call.
#[cfg(feature = "metrics")]
fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("no other metrics recorder is installed")
    })
}

/// Starts the workers, then binds `127.0.0.1:port` (0: any free port): once this returns,
/// the service is ready, and its first requests do not wait for processes to start.
pub async fn bind(port: u16) -> std::io::Result<TcpListener> {
    offload::warm_up().await.map_err(std::io::Error::other)?;
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await
}

/// Serves [`router`] on `listener` until `stop` completes, then stops accepting, lets the
/// requests in flight finish (offloaded ones are bounded by their timeout), and shuts the
/// workers down: when this returns, no worker process is left.
pub async fn serve(
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router()).with_graceful_shutdown(stop).await?;
    offload::shutdown(SHUTDOWN_GRACE).await;
    Ok(())
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM. The handlers are in place once this returns, so
/// a signal that comes before the future is first polled is not missed. Needs a runtime.
pub fn stop_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).expect("a SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// The heavy endpoint: the key is derived in a worker process, and the runtime stays free.
async fn hash(body: Result<Json<HashRequest>, JsonRejection>) -> Result<Json<HashResponse>, ApiError> {
    let request = validate(body)?;
    let iterations = request.iterations;
    let key = derive_key(request.password.into_bytes(), request.salt.into_bytes(), iterations).await?;
    Ok(Json(HashResponse::new(iterations, &key)))
}

/// The same work done inline, on a runtime thread, for comparison: while it runs, that thread
/// serves nothing else, and nothing can stop it early.
async fn hash_inline(body: Result<Json<HashRequest>, JsonRejection>) -> Result<Json<HashResponse>, ApiError> {
    let request = validate(body)?;
    let key = pbkdf2_sha256(request.password.as_bytes(), request.salt.as_bytes(), request.iterations);
    Ok(Json(HashResponse::new(request.iterations, &key)))
}

fn validate(body: Result<Json<HashRequest>, JsonRejection>) -> Result<HashRequest, ApiError> {
    // 413 over the body limit, 415 without a JSON content type, 400 for JSON that does not
    // parse, 422 for JSON of the wrong shape.
    let Json(request) = body.map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))?;
    if !(1..=MAX_ITERATIONS).contains(&request.iterations) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("`iterations` must be between 1 and {MAX_ITERATIONS}"),
        ));
    }
    Ok(request)
}

impl HashResponse {
    fn new(iterations: u32, key: &[u8]) -> Self {
        let hash = key.iter().map(|b| format!("{b:02x}")).collect();
        HashResponse { algorithm: "pbkdf2-sha256".into(), iterations, hash }
    }
}

/// An error response: a status and a message, sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// Seconds, for the `Retry-After` header of a 503.
    retry_after: u64,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), retry_after: 1 }
    }
}

/// The status an `offload::Error` is answered with.
pub fn status_of(error: &offload::Error) -> StatusCode {
    use offload::Error;
    match error {
        Error::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        Error::Overloaded { .. } | Error::CircuitOpen { .. } | Error::Shutdown { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        // Panicked, Crashed, MemoryLimit, Spawn, Protocol, Config, and whatever comes later.
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<offload::Error> for ApiError {
    fn from(error: offload::Error) -> Self {
        let status = status_of(&error);
        let retry_after = match &error {
            offload::Error::CircuitOpen { retry_in, .. } => retry_in.as_secs() + 1,
            _ => 1,
        };
        let message = match status {
            StatusCode::GATEWAY_TIMEOUT => "the work did not finish within its time budget",
            StatusCode::SERVICE_UNAVAILABLE => "the service is busy or stopping; try again",
            _ => {
                // A panic, a crash, a bad configuration: the full error (pid, exit status, the
                // worker's last stderr lines) is for the operator's log, not for the client.
                // Timeouts and overload are expected under load: counted, not logged, once
                // there are metrics.
                eprintln!("{status}: {error}");
                "internal error"
            }
        };
        ApiError { status, message: message.into(), retry_after }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after));
        }
        response
    }
}
