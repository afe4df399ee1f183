//! The HTTP edge: `POST /v1/runner` with `Authorization: Bearer <pod token>` mints a runner;
//! `GET /healthz` says the broker is up. Plain HTTP/1.1 (TLS: docs/broker.md).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::warn;

use crate::mint::{Answer, Broker};

pub async fn serve(listener: TcpListener, broker: Arc<Broker>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let broker = broker.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let broker = broker.clone();
                async move { Ok::<_, Infallible>(handle(req, &broker).await) }
            });
            // A client that trickles its headers is dropped after 10 s: slow connections cannot
            // pile up. Bodies are never read (the token is a header).
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                warn!("connection: {e}");
            }
        });
    }
}

async fn handle(req: Request<Incoming>, broker: &Broker) -> Response<Full<Bytes>> {
    let answer = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => Answer {
            status: 200,
            body: json!({"ok": true}),
        },
        (&Method::POST, "/v1/runner") => match bearer(&req) {
            Some(token) => broker.mint(&token).await,
            None => Answer {
                status: 401,
                body: json!({"error": "no token: send the virt-launcher pod's service-account token (the serviceAccount disk's `token` file) as `Authorization: Bearer <token>`"}),
            },
        },
        (_, "/v1/runner") => Answer {
            status: 405,
            body: json!({"error": "use POST /v1/runner"}),
        },
        _ => Answer {
            status: 404,
            body: json!({"error": "not found: the broker answers POST /v1/runner and GET /healthz"}),
        },
    };
    let mut response = Response::new(Full::new(Bytes::from(answer.body.to_string())));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("a valid header"),
    );
    response
        .headers_mut()
        .insert("cache-control", "no-store".parse().expect("a valid header"));
    response
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    let value = req.headers().get("authorization")?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty() && token.len() <= 16 * 1024).then(|| token.to_string())
}
