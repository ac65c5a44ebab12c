//! A webhook receiver for `bench/http.sh`: answers every POST with 200 and
//! counts them. `GET /stats` gives the count and the times of the first and
//! last request (ms since the receiver started); `POST /reset` zeroes them.
//!
//!     cargo run --release --example http_receiver -- 18080

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::State;
use axum::routing::{get, post};

struct Stats {
    started: Instant,
    count: AtomicU64,
    first_ms: AtomicU64,
    last_ms: AtomicU64,
}

async fn hook(State(s): State<Arc<Stats>>, _body: String) -> &'static str {
    let now = s.started.elapsed().as_millis() as u64;
    if s.count.fetch_add(1, Ordering::SeqCst) == 0 {
        s.first_ms.store(now, Ordering::SeqCst);
    }
    s.last_ms.fetch_max(now, Ordering::SeqCst);
    "ok"
}

async fn stats(State(s): State<Arc<Stats>>) -> String {
    format!(
        "{{\"count\": {}, \"first_ms\": {}, \"last_ms\": {}}}",
        s.count.load(Ordering::SeqCst),
        s.first_ms.load(Ordering::SeqCst),
        s.last_ms.load(Ordering::SeqCst)
    )
}

async fn reset(State(s): State<Arc<Stats>>) -> &'static str {
    s.count.store(0, Ordering::SeqCst);
    s.first_ms.store(0, Ordering::SeqCst);
    s.last_ms.store(0, Ordering::SeqCst);
    "reset"
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(18080);
    let s = Arc::new(Stats {
        started: Instant::now(),
        count: AtomicU64::new(0),
        first_ms: AtomicU64::new(0),
        last_ms: AtomicU64::new(0),
    });
    let app = axum::Router::new()
        .route("/hook", post(hook))
        .route("/stats", get(stats))
        .route("/reset", post(reset))
        .with_state(s);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    axum::serve(listener, app).await.expect("serve");
}
